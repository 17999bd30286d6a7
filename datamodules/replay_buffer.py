"""Episodes in Diffusion Policy's zarr v2 layout: `data/<key>` concatenated over episodes, `meta/episode_ends`.

The Push-T demonstrations (`pusht_cchi_v7_replay.zarr`) are read as they are
published; the embedded obstacle task writes its generated demos in the same
layout, so one reader serves both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from difflab.atomic_dir import atomic_dir
from difflab.errors import DataError, MissingFileError


class ReplayBuffer:
    """`data[key]` has one row per step; episode i is rows episode_ends[i-1]:episode_ends[i]."""

    def __init__(self, data: dict[str, np.ndarray], episode_ends: np.ndarray):
        episode_ends = np.asarray(episode_ends, dtype=np.int64)
        if episode_ends.ndim != 1 or len(episode_ends) == 0 or np.any(np.diff(episode_ends) <= 0) or episode_ends[0] <= 0:
            raise ValueError("episode_ends must be a non-empty, strictly increasing 1-D array of exclusive end indices")
        for key, value in data.items():
            if len(value) != episode_ends[-1]:
                raise ValueError(f"data/{key} has {len(value)} rows but episode_ends says {episode_ends[-1]} steps")
        self.data = data
        self.episode_ends = episode_ends

    @classmethod
    def from_episodes(cls, episodes: list[dict[str, np.ndarray]]) -> "ReplayBuffer":
        if not episodes:
            raise ValueError("no episodes given")
        keys = list(episodes[0])
        data = {k: np.concatenate([np.asarray(ep[k]) for ep in episodes]) for k in keys}
        return cls(data, np.cumsum([len(ep[keys[0]]) for ep in episodes]))

    @property
    def num_episodes(self) -> int:
        return len(self.episode_ends)

    @property
    def num_steps(self) -> int:
        return int(self.episode_ends[-1])

    @property
    def episode_starts(self) -> np.ndarray:
        return np.concatenate([[0], self.episode_ends[:-1]])

    def episode(self, i: int) -> dict[str, np.ndarray]:
        start, end = self.episode_starts[i], self.episode_ends[i]
        return {k: v[start:end] for k, v in self.data.items()}

    @classmethod
    def load(cls, path: str | Path, keys: list[str] | None = None, hint: str = "") -> "ReplayBuffer":
        """Read `keys` (all when None) into memory; a missing file or key fails with what there is instead."""
        import zarr

        path = Path(path).expanduser()
        if not path.exists():
            raise MissingFileError(f"replay buffer {path} does not exist. {hint}".strip())
        layout = "it must be a zarr v2 group with meta/episode_ends and data/<key> arrays (Diffusion Policy's replay-buffer layout)"
        try:
            root = zarr.open_group(str(path), mode="r")
            have = sorted(root["data"].array_keys()) if "data" in root else []
            has_ends = "meta" in root and "episode_ends" in root["meta"]
        except Exception as err:  # not a zarr store at all: an empty folder, a file, another format
            raise DataError(f"{path} is not a replay buffer ({type(err).__name__}): {layout}. {hint}".strip()) from None
        if not has_ends:
            raise DataError(f"{path} is not a replay buffer: {layout} (it has data keys {have}). {hint}".strip())
        keys = have if keys is None else list(keys)
        missing = [k for k in keys if k not in have]
        if missing:
            raise DataError(f"{path} has no data/{missing[0]}; its keys are {have}")
        data = {k: np.asarray(root["data"][k][:]) for k in keys}  # finite values: TrajectoryDataModule.buffer checks
        try:
            return cls(data, np.asarray(root["meta"]["episode_ends"][:]))
        except ValueError as err:
            raise DataError(f"{path}: {err}") from None

    def save(self, path: str | Path) -> Path:
        """Write in zarr v2 (readable by Diffusion Policy's code); atomic: a crash never leaves half a buffer."""
        import zarr

        path = Path(path)
        with atomic_dir(path) as tmp:
            zarr3 = hasattr(zarr, "create_array")
            root = zarr.open_group(str(tmp), mode="w", **({"zarr_format": 2} if zarr3 else {}))
            arrays = {f"data/{k}": np.ascontiguousarray(v) for k, v in self.data.items()} | {"meta/episode_ends": self.episode_ends}
            for name, value in arrays.items():
                root.create_array(name, data=value) if zarr3 else root.array(name, value)
        return path


def window_indices(episode_ends: np.ndarray, episodes: np.ndarray, length: int, pad_before: int, pad_after: int) -> np.ndarray:
    """Row indices (num_windows, length) of every window of `length` steps inside the chosen episodes.

    Windows may start up to `pad_before` steps before an episode and end up to
    `pad_after` steps after it; the out-of-episode steps repeat the first or
    last step (Diffusion Policy's sequence sampler pads this way), so the policy
    learns to act from the first observation and to finish an episode. Windows
    never cross episodes.
    """
    starts = np.concatenate([[0], episode_ends[:-1]])
    offsets = np.arange(length)
    out = []
    for i in episodes:
        start, end = int(starts[i]), int(episode_ends[i])
        n = end - start
        first = np.arange(-pad_before, n - length + pad_after + 1)
        if len(first) == 0:
            continue
        out.append(start + np.clip(first[:, None] + offsets[None, :], 0, n - 1))
    return np.concatenate(out) if out else np.zeros((0, length), dtype=np.int64)


def split_episodes(num_episodes: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train/val by whole episodes (windows of one episode never straddle the split)."""
    order = np.random.default_rng(seed).permutation(num_episodes)
    num_val = int(round(num_episodes * val_fraction))
    if val_fraction > 0:
        num_val = min(max(num_val, 1), num_episodes - 1)
    return np.sort(order[num_val:]), np.sort(order[:num_val])
