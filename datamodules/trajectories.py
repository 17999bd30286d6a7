"""Demonstrations as (observation history -> action chunk) pairs, for diffusion policies and their baselines.

A batch is {'x': normalized action chunk (B, horizon, action_dim), 'cond':
normalized observation history (B, n_obs_steps * obs_dim)}: every method models
x given cond through the same contract as images. With camera keys among the
observations (`env_image_shapes`), 'cond' is a dict instead: each camera's uint8
frames (B, n_obs_steps, C, H, W) and 'low_dim', the normalized state keys
(B, n_obs_steps, low_dim); the model's observation encoder turns it into the
flat cond (`lightning_modules.nets.obs_encoder`). The normalizers, observation
keys and horizons are this datamodule's `state_dict`, which Lightning writes
into every checkpoint, so a checkpoint alone can act (`envs.policy.load_policy`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.base import ArrayDataModule, check_finite
from difflab.normalizer import MinMaxNormalizer
from datamodules.replay_buffer import ReplayBuffer, split_episodes, window_indices
from difflab.errors import ConfigError


class TrajectoryDataModule(ArrayDataModule):
    """Subclasses set `task` (the environment's name in `envs.TASKS`) and `env_obs_dims` (what it can observe)
    and implement `load_buffer()`; `observation(buffer, key)` maps a key to (N, dim) rows. The datamodule never
    builds the environment: `envs.make_env(task)` does."""

    data_kind = "trajectory"
    cond_kind = "observations"
    task: str = ""
    env_obs_dims: dict[str, int] = {}
    env_image_shapes: dict[str, tuple[int, int, int]] = {}  # camera keys (C, H, W), uint8
    action_dim: int = 2

    def __init__(
        self,
        obs_keys: list[str],
        n_obs_steps: int = 2,
        horizon: int = 16,
        n_action_steps: int = 8,
        val_fraction: float = 0.05,
        split_seed: int = 0,
        max_train_episodes: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory, persistent_workers=persistent_workers)
        self.obs_keys = list(obs_keys)
        unknown = [k for k in self.obs_keys if k not in self.env_obs_dims and k not in self.env_image_shapes]
        if not self.obs_keys or unknown:
            raise ConfigError(f"data.obs_keys={self.obs_keys}: unknown {unknown}; {type(self).__name__} observes "
                              f"{self.env_obs_dims}{f' and the cameras {sorted(self.env_image_shapes)}' if self.env_image_shapes else ''}")
        self.image_keys = [k for k in self.obs_keys if k in self.env_image_shapes]
        self.low_keys = [k for k in self.obs_keys if k not in self.env_image_shapes]
        if not self.low_keys:
            raise ConfigError(f"data.obs_keys={self.obs_keys} has cameras only: add a state key (e.g. agent_pos) beside them")
        if not 1 <= n_obs_steps <= horizon or not 1 <= n_action_steps <= horizon - n_obs_steps + 1:
            raise ValueError(
                f"need 1 <= n_obs_steps ({n_obs_steps}) <= horizon ({horizon}) and the executed actions "
                f"n_action_steps ({n_action_steps}) to fit in the chunk after the current step (<= {horizon - n_obs_steps + 1})"
            )
        self.n_obs_steps, self.horizon, self.n_action_steps = n_obs_steps, horizon, n_action_steps
        self.val_fraction, self.split_seed = val_fraction, split_seed
        if max_train_episodes is not None and int(max_train_episodes) < 1:
            raise ConfigError(f"data.max_train_episodes must be a positive number of episodes (or null: all), got {max_train_episodes}")
        self.max_train_episodes = None if max_train_episodes is None else int(max_train_episodes)
        self.obs_dim = sum(self.env_obs_dims[k] for k in self.low_keys)  # the state part (cameras go through the encoder)
        self.data_shape = (horizon, self.action_dim)
        self.cond_dim = n_obs_steps * self.obs_dim  # with cameras, build_model takes the encoder's size instead
        self.obs_normalizer: MinMaxNormalizer | None = None
        self.action_normalizer: MinMaxNormalizer | None = None
        self._buffer: ReplayBuffer | None = None
        self._images: dict[str, torch.Tensor] | None = None
        self._episodes: dict[str, np.ndarray] = {}

    # --- what a task provides -----------------------------------------------------------------
    @property
    def source(self) -> str:
        """Where the demonstrations come from, for messages (a path, or the generator's name)."""
        return str(getattr(self, "path", None) or getattr(self, "root", None) or type(self).__name__)

    def load_buffer(self) -> ReplayBuffer:
        raise NotImplementedError

    def observation(self, buffer: ReplayBuffer, key: str) -> np.ndarray:
        return buffer.data[key].reshape(buffer.num_steps, -1)

    def images(self, buffer: ReplayBuffer, key: str) -> torch.Tensor:
        """A camera key as uint8 (N, C, H, W); subclasses map their stored layout to it."""
        return torch.as_tensor(buffer.data[key])

    @property
    def obs_spec(self) -> dict | None:
        """What build_model needs for the observation encoder (None without cameras); known before any data is read."""
        if not self.image_keys:
            return None
        return {"image_shapes": {k: list(self.env_image_shapes[k]) for k in self.image_keys}, "low_dim": self.obs_dim,
                "n_obs_steps": self.n_obs_steps}

    # --- windows ------------------------------------------------------------------------------
    def buffer(self) -> ReplayBuffer:
        if self._buffer is None:
            buffer = self.load_buffer()
            for key, value in buffer.data.items():  # every source passes here: zarr, LeRobot, generated demos
                check_finite(f"data/{key}", value.reshape(len(value), -1) if value.ndim else value, f"{self.source}: ")
            self._buffer = buffer
            train, val = split_episodes(self._buffer.num_episodes, self.val_fraction, self.split_seed)
            if self.max_train_episodes is not None and len(train) > self.max_train_episodes:
                # Diffusion Policy's max_train_episodes: a seeded subset of the training episodes, the
                # validation episodes untouched (the paper trained Push-T on 90 of its 206).
                keep = np.random.default_rng(self.split_seed).choice(len(train), self.max_train_episodes, replace=False)
                train = np.sort(train[keep])
            self._episodes = {"train": train, "val": val}
        return self._buffer

    def _rows(self, buffer: ReplayBuffer) -> tuple[np.ndarray, np.ndarray]:
        obs = np.concatenate([self.observation(buffer, k).astype(np.float32) for k in self.low_keys], axis=1)
        if obs.shape[1] != self.obs_dim:
            raise ValueError(f"observations {self.low_keys} have {obs.shape[1]} dims in the data, the environment gives {self.obs_dim}")
        action = buffer.data["action"].reshape(buffer.num_steps, -1).astype(np.float32)
        return obs, action

    def fit_normalizers(self) -> None:
        buffer = self.buffer()
        obs, action = self._rows(buffer)
        train_rows = np.concatenate([np.arange(s, e) for s, e in zip(buffer.episode_starts[self._episodes["train"]], buffer.episode_ends[self._episodes["train"]])])
        self.obs_normalizer = MinMaxNormalizer.fit(obs[train_rows])
        self.action_normalizer = MinMaxNormalizer.fit(action[train_rows])

    def load_split(self, split: str) -> dict[str, torch.Tensor]:
        buffer = self.buffer()
        if self.obs_normalizer is None:
            self.fit_normalizers()
        obs, action = self._rows(buffer)
        # Pad so the first window's history starts at the first step and the last chunk may run past the end.
        idx = window_indices(buffer.episode_ends, self._episodes[split], self.horizon, self.n_obs_steps - 1, self.n_action_steps - 1)
        x = self.action_normalizer.normalize(torch.from_numpy(action[idx]))
        cond = self.obs_normalizer.normalize(torch.from_numpy(obs[idx[:, : self.n_obs_steps]]))
        if self.image_keys:  # frames are gathered per batch from one copy: windows would repeat each n_obs_steps times
            if self._images is None:
                self._images = {k: self._checked_images(buffer, k) for k in self.image_keys}
            return ImageWindows(x.contiguous(), cond.contiguous(), self._images, torch.from_numpy(idx[:, : self.n_obs_steps]))
        return {"x": x.contiguous(), "cond": cond.reshape(len(idx), -1).contiguous()}

    def _checked_images(self, buffer: ReplayBuffer, key: str) -> torch.Tensor:
        images = self.images(buffer, key)
        want = tuple(self.env_image_shapes[key])
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != want or len(images) != buffer.num_steps:
            raise ValueError(f"camera {key}: expected uint8 frames ({buffer.num_steps}, {', '.join(map(str, want))}), got {images.dtype} {tuple(images.shape)}")
        return images

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        return self.action_normalizer.unnormalize(x)

    def make_metric(self):
        return None  # policies are scored closed-loop: callbacks.rollout and `evaluate.py metric=policy`

    # --- checkpoint: everything a policy needs to act without the data ------------------------
    def state_dict(self) -> dict:
        if self.obs_normalizer is None:
            self.fit_normalizers()
        return {
            "obs_normalizer": self.obs_normalizer.state_dict(),
            "action_normalizer": self.action_normalizer.state_dict(),
            "obs_keys": list(self.obs_keys),
            "n_obs_steps": self.n_obs_steps,
            "horizon": self.horizon,
            "n_action_steps": self.n_action_steps,
        }

    def policy_spec(self) -> dict:
        """What a policy needs to act, without the data: saved in every checkpoint as its `policy` entry."""
        return {**self.state_dict(), "task": self.task, "obs_dims": {k: int(self.env_obs_dims[k]) for k in self.low_keys},
                "image_shapes": {k: list(self.env_image_shapes[k]) for k in self.image_keys}}

    def load_state_dict(self, state: dict) -> None:
        if list(state["obs_keys"]) != self.obs_keys or state["horizon"] != self.horizon or state["n_obs_steps"] != self.n_obs_steps:
            raise ValueError(
                f"checkpoint policy has obs_keys={list(state['obs_keys'])}, horizon={state['horizon']}, n_obs_steps={state['n_obs_steps']}; "
                f"this run has obs_keys={self.obs_keys}, horizon={self.horizon}, n_obs_steps={self.n_obs_steps}: use the same data.* settings"
            )
        self.obs_normalizer = MinMaxNormalizer.from_state_dict(state["obs_normalizer"])
        self.action_normalizer = MinMaxNormalizer.from_state_dict(state["action_normalizer"])


class ImageWindows(Dataset):
    """Windows over demonstrations with camera frames: x and the normalized state history per window, the frames
    gathered from one uint8 copy per batch (`__getitems__`: one index op per key, not B calls)."""

    def __init__(self, x: torch.Tensor, low_dim: torch.Tensor, images: dict[str, torch.Tensor], obs_rows: torch.Tensor):
        self.x, self.low_dim, self.images, self.obs_rows = x, low_dim, images, obs_rows

    def __len__(self) -> int:
        return len(self.x)

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The per-window tensors (what k-means and statistics read); frames are not repeated per window."""
        return {"x": self.x, "low_dim": self.low_dim}

    def __getitems__(self, indices) -> dict:
        idx = torch.as_tensor(indices, dtype=torch.long)
        rows = self.obs_rows[idx]
        return {"x": self.x[idx], "cond": {"low_dim": self.low_dim[idx], **{k: v[rows] for k, v in self.images.items()}}}

    def __getitem__(self, index: int) -> dict:
        batch = self.__getitems__([index])
        return {"x": batch["x"][0], "cond": {k: v[0] for k, v in batch["cond"].items()}}
