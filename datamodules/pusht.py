"""The Diffusion Policy paper's human Push-T demonstrations (`pusht_cchi_v7_replay.zarr`), state-based.

Observation keys: `state` (agent x, y, block x, y, angle), `keypoint` (the T's
9 keypoints, 18 values) and `agent_pos` (state[:2]); the paper's low-dim
policy observes keypoint + agent_pos (20 values per step).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datamodules.replay_buffer import ReplayBuffer
from datamodules.trajectories import TrajectoryDataModule

DOWNLOAD_HINT = (
    "Get the Push-T demonstrations from the Diffusion Policy project "
    "(https://diffusion-policy.cs.columbia.edu/data/training/pusht.zip, which unpacks to "
    "pusht/pusht_cchi_v7_replay.zarr) and pass data.path=/path/to/pusht_cchi_v7_replay.zarr "
    "(or set the PUSHT_ZARR environment variable)."
)


class PushTDataModule(TrajectoryDataModule):
    task = "pusht"
    env_obs_dims = {"state": 5, "keypoint": 18, "agent_pos": 2}
    action_dim = 2

    def __init__(self, path: str, obs_keys: list[str] = ("keypoint", "agent_pos"), **kwargs):
        super().__init__(obs_keys=list(obs_keys), **kwargs)
        self.path = Path(path).expanduser()

    def load_buffer(self) -> ReplayBuffer:
        # agent_pos is not stored: it is the first two entries of state, as in Diffusion Policy's dataset.
        stored = sorted({"state" if k == "agent_pos" else k for k in self.obs_keys} | {"action"})
        return ReplayBuffer.load(self.path, stored, hint=f"Push-T demonstrations not found. {DOWNLOAD_HINT}")

    def observation(self, buffer: ReplayBuffer, key: str) -> np.ndarray:
        if key == "agent_pos":
            return buffer.data["state"][:, :2]
        return super().observation(buffer, key)
