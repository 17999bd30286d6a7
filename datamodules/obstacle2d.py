"""The embedded imitation task: demonstrations of a scripted expert that passes a disc obstacle left or right.

Generated on the fly from a seed (no download), held as a replay buffer in the
same layout as the Push-T zarr; `demos_path` also writes them to disk.
"""

from __future__ import annotations

from datamodules.replay_buffer import ReplayBuffer
from datamodules.trajectories import TrajectoryDataModule


class Obstacle2DDataModule(TrajectoryDataModule):
    task = "obstacle2d"
    env_obs_dims = {"agent_pos": 2}
    action_dim = 2

    def __init__(self, num_episodes: int = 200, seed: int = 0, obs_keys: list[str] = ("agent_pos",), demos_path: str | None = None, **kwargs):
        super().__init__(obs_keys=list(obs_keys), **kwargs)
        self.num_episodes, self.seed, self.demos_path = num_episodes, seed, demos_path

    def load_buffer(self) -> ReplayBuffer:
        from envs.obstacle2d import generate_demos

        buffer = ReplayBuffer.from_episodes(generate_demos(self.num_episodes, self.seed))
        if self.demos_path:
            buffer.save(self.demos_path)
        return buffer
