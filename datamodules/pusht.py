"""The Diffusion Policy paper's human Push-T demonstrations (`pusht_cchi_v7_replay.zarr`).

Observation keys: `state` (agent x, y, block x, y, angle), `keypoint` (the T's
9 keypoints, 18 values) and `agent_pos` (state[:2]); the paper's low-dim
policy observes keypoint + agent_pos (20 values per step), its image policy
`image` (the zarr's 96x96 RGB `img`, gym-pusht's observation render) + agent_pos.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from datamodules.replay_buffer import ReplayBuffer
from datamodules.trajectories import TrajectoryDataModule
from difflab.errors import DataError

DOWNLOAD_HINT = (
    "Get the Push-T demonstrations from the Diffusion Policy project "
    "(https://diffusion-policy.cs.columbia.edu/data/training/pusht.zip, which unpacks to "
    "pusht/pusht_cchi_v7_replay.zarr) and pass data.path=/path/to/pusht_cchi_v7_replay.zarr "
    "(or set the PUSHT_ZARR environment variable)."
)


IMAGE_CHUNK = 2048  # frames converted to uint8 at a time: the zarr stores them as float32 (4x the memory)


def read_frames(path: Path, key: str = "img") -> torch.Tensor:
    """The zarr's (N, H, W, 3) frames as uint8 (N, 3, H, W), converted chunk by chunk."""
    import zarr

    data = zarr.open_group(str(path), mode="r")["data"]
    if key not in data:
        raise DataError(f"{path} has no camera frames (data/{key}); its keys are {sorted(data.array_keys())}. An image "
                        "experiment needs Diffusion Policy's pusht_cchi_v7_replay.zarr with its img array, or pass "
                        "data.obs_keys without image for a state policy")
    array = data[key]
    out = torch.empty((array.shape[0], array.shape[3], array.shape[1], array.shape[2]), dtype=torch.uint8)
    for start in range(0, array.shape[0], IMAGE_CHUNK):
        block = np.asarray(array[start : start + IMAGE_CHUNK])
        if not np.isfinite(block).all() or block.min() < 0 or block.max() > 255:
            raise DataError(f"{path}: data/{key} rows {start}.. are not pixel values in 0..255")
        out[start : start + len(block)] = torch.from_numpy(np.rint(block).astype(np.uint8)).permute(0, 3, 1, 2)
    return out


class PushTDataModule(TrajectoryDataModule):
    task = "pusht"
    env_obs_dims = {"state": 5, "keypoint": 18, "agent_pos": 2}
    env_image_shapes = {"image": (3, 96, 96)}
    action_dim = 2

    def __init__(self, path: str, obs_keys: list[str] = ("keypoint", "agent_pos"), **kwargs):
        super().__init__(obs_keys=list(obs_keys), **kwargs)
        self.path = Path(path).expanduser()

    def load_buffer(self) -> ReplayBuffer:
        # agent_pos is not stored: it is the first two entries of state, as in Diffusion Policy's dataset.
        stored = sorted({"state" if k == "agent_pos" else k for k in self.low_keys} | {"action"})
        return ReplayBuffer.load(self.path, stored, hint=f"Push-T demonstrations not found. {DOWNLOAD_HINT}")

    def images(self, buffer: ReplayBuffer, key: str) -> torch.Tensor:
        return read_frames(self.path, "img")

    def observation(self, buffer: ReplayBuffer, key: str) -> np.ndarray:
        if key == "agent_pos":
            return buffer.data["state"][:, :2]
        return super().observation(buffer, key)
