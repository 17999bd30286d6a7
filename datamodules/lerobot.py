"""LeRobotDataset folders (codebase v3.0) on local disk, read without LeRobot and without conversion.

The layout (LeRobot's):

    meta/info.json                              fps, features {name: {dtype, shape}}, data_path / video_path templates
    meta/stats.json                             per feature min / max / mean / std
    meta/episodes/chunk-XXX/file-YYY.parquet    one row per episode: episode_index, length, and per camera
                                                videos/<key>/{chunk_index, file_index, from_timestamp}
    data/chunk-XXX/file-YYY.parquet             one row per frame: index, episode_index, frame_index, the state
                                                and action features (fixed-size lists)
    videos/<key>/chunk-XXX/file-YYY.mp4         camera frames, several episodes per file one after another

`data.keys` maps the names our policies and environments use to the dataset's features, e.g. for LeRobot's
Push-T {agent_pos: observation.state, image: observation.image}; with `data.task: pusht` such a policy is scored
in gym-pusht like one trained on the zarr. Camera frames are decoded once with PyAV (AV1, H.264, ...) and kept as
uint8. `data.normalizer: stats` scales with meta/stats.json's min / max (LeRobot's MIN_MAX mode) instead of
fitting on the training episodes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from datamodules.replay_buffer import ReplayBuffer
from datamodules.trajectories import TrajectoryDataModule
from difflab.errors import ConfigError, DataError, MissingFileError
from difflab.normalizer import MinMaxNormalizer

HINT = ("pass data.root=/path/to/a LeRobotDataset folder (meta/info.json, data/, videos/), e.g. one under "
        "~/.cache/huggingface/lerobot/<user>/<name> that LeRobot downloaded")


def read_info(root: Path) -> dict:
    path = root / "meta" / "info.json"
    if not path.is_file():
        raise MissingFileError(f"{root} is not a LeRobotDataset: {path} does not exist. {HINT}")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err}): it may be cut short by an interrupted download or copy; "
                        "download the dataset again") from None
    if not isinstance(info, dict) or not isinstance(info.get("features"), dict):
        raise DataError(f"{path} has no 'features' table: it is not a LeRobotDataset's info.json; download the dataset again")
    version = str(info.get("codebase_version", "?"))
    if not version.startswith("v3"):
        raise DataError(f"{root} is a LeRobotDataset {version}; this reader reads the v3.0 layout "
                        "(convert it with LeRobot's convert_dataset_v21_to_v30 script)")
    return info


def read_parquet_rows(files: list[Path], columns: list[str] | None = None) -> dict[str, np.ndarray]:
    """The columns (all when None) of the parquet files, concatenated, list columns as 2-D arrays."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not files:
        return {}
    table = pa.concat_tables([pq.read_table(f, columns=columns) for f in files])
    return {name: np.asarray(table.column(name).to_pylist()) for name in table.column_names}


def decode_image(cell, where: str) -> np.ndarray:
    """One frame stored in the parquet (LeRobot's use_videos=False: Hugging Face's Image feature, a struct of
    PNG/JPEG `bytes` and a `path`) as uint8 (H, W, 3)."""
    import io

    from PIL import Image

    data = cell.get("bytes") if isinstance(cell, dict) else cell
    if not data:
        raise DataError(f"{where}: the frame has no image bytes (a path-only image column is not supported; "
                        "write the dataset with its images embedded)")
    return np.array(Image.open(io.BytesIO(data)).convert("RGB"))


def decode_video(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(frames uint8 (N, H, W, 3), presentation times in seconds (N,)) of the file's first video stream."""
    import av

    if not path.is_file():
        raise MissingFileError(f"video {path} does not exist (the dataset's meta/episodes points to it)")
    frames, times = [], []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            times.append(float(frame.time))
    return np.stack(frames), np.asarray(times)


# LeRobot's Push-T (lerobot/pusht): what data.keys=null means
DEFAULT_KEYS = {"agent_pos": "observation.state", "image": "observation.image"}


class LeRobotDataModule(TrajectoryDataModule):
    def __init__(self, root: str, keys: dict | None = None, action_key: str = "action", task: str = "", normalizer: str = "fit",
                 **kwargs):
        self.root = Path(root).expanduser()
        self.info = read_info(self.root)
        self.keys = dict(DEFAULT_KEYS if keys is None else keys)
        if not self.keys:
            raise ConfigError("data.keys is empty: map at least one observation, e.g. data.keys={agent_pos:observation.state}")
        self.action_key = action_key
        self.task = task or ""
        if normalizer not in ("fit", "stats"):
            raise ConfigError(f"data.normalizer={normalizer!r}: use fit (min/max of the training episodes) or stats (meta/stats.json)")
        self.normalizer = normalizer
        features = self.info["features"]
        have = sorted(k for k in features if k not in ('timestamp', 'frame_index', 'episode_index', 'index', 'task_index'))
        if action_key not in features:
            raise ConfigError(f"data.action_key={action_key} is not a feature of {self.root}; its features are {have}")
        missing = [f for f in self.keys.values() if f not in features]
        if missing:
            raise ConfigError(f"data.keys names features {missing} that {self.root} does not have; its features are {have}")
        for feature in (*self.keys.values(), action_key):
            spec = features[feature]
            if not isinstance(spec, dict) or "shape" not in spec or "dtype" not in spec:
                raise DataError(f"{self.root / 'meta' / 'info.json'}: feature {feature!r} has no "
                                f"{'shape' if isinstance(spec, dict) and 'dtype' in spec else 'dtype or shape'}; every "
                                "feature of a LeRobotDataset's info.json has both: download the dataset again")
        self.env_obs_dims, self.env_image_shapes = {}, {}
        for name, feature in self.keys.items():
            spec = features[feature]
            if spec["dtype"] in ("video", "image"):
                self.env_image_shapes[name] = self._chw(feature, spec)
            else:
                self.env_obs_dims[name] = int(np.prod(spec["shape"]))
        self.action_dim = int(np.prod(features[action_key]["shape"]))
        super().__init__(obs_keys=list(self.keys), **kwargs)

    @staticmethod
    def _chw(feature: str, spec: dict) -> tuple[int, int, int]:
        shape, names = list(spec["shape"]), [str(n).lower() for n in (spec.get("names") or [])]
        if names[:1] in (["height"], ["h"]):  # (H, W, C)
            h, w, c = shape
        elif names[:1] in (["channels"], ["channel"], ["c"]) or shape[0] in (1, 3):  # (C, H, W)
            c, h, w = shape
        else:
            h, w, c = shape
        if c != 3:
            raise DataError(f"camera {feature} has {c} channels; the image encoder reads RGB")
        return (3, int(h), int(w))

    # --- reading ------------------------------------------------------------------------------------------------
    def _files(self, pattern: str) -> list[Path]:
        return sorted(self.root.glob(pattern))

    def load_buffer(self) -> ReplayBuffer:
        wanted = ["index", "episode_index", self.action_key, *(f for n, f in self.keys.items() if n in self.env_obs_dims)]
        frames = read_parquet_rows(self._files("data/*/*.parquet"), columns=wanted)
        if not frames:
            raise MissingFileError(f"{self.root}/data/ has no parquet files. {HINT}")
        order = np.argsort(frames["index"], kind="stable")
        self._order = order  # frames stored in the parquet (images) are read back in this order
        frames = {k: v[order] for k, v in frames.items()}
        episode_index = frames["episode_index"]
        if np.any(np.diff(episode_index) < 0):
            raise DataError(f"{self.root}: frames are not grouped by episode in index order")
        ends = np.flatnonzero(np.diff(episode_index)) + 1
        ends = np.concatenate([ends, [len(episode_index)]])
        data = {}
        for name, feature in [*((n, f) for n, f in self.keys.items() if n in self.env_obs_dims), ("action", self.action_key)]:
            values = np.asarray(frames[feature], dtype=np.float32).reshape(len(episode_index), -1)
            data[name] = values
        self._episode_ids = episode_index[ends - 1]
        return ReplayBuffer(data, ends)

    def observation(self, buffer: ReplayBuffer, key: str) -> np.ndarray:
        return buffer.data[key]

    def images(self, buffer: ReplayBuffer, key: str) -> torch.Tensor:
        """The camera's frames of every episode, in buffer order, uint8 (N, 3, H, W): decoded from its videos, or
        from the data parquet where the dataset stores images (dtype 'image', LeRobot's use_videos=False)."""
        feature = self.keys[key]
        if self.info["features"][feature]["dtype"] == "image":
            return self._parquet_images(buffer, key)
        episodes = read_parquet_rows(self._files("meta/episodes/*/*.parquet"))
        if not episodes:
            raise MissingFileError(f"{self.root}/meta/episodes/ has no parquet files: the video positions are there")
        row_of = {int(e): i for i, e in enumerate(episodes["episode_index"])}
        fps = float(self.info["fps"])
        template = self.info.get("video_path", "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4")
        decoded: dict[Path, dict[int, np.ndarray]] = {}
        out = torch.empty((buffer.num_steps, *self.env_image_shapes[key]), dtype=torch.uint8)
        for i, episode in enumerate(self._episode_ids):
            if int(episode) not in row_of:
                raise DataError(f"{self.root}: episode {episode} has frames but no row in meta/episodes")
            row = row_of[int(episode)]
            path = self.root / template.format(video_key=feature, chunk_index=int(episodes[f"videos/{feature}/chunk_index"][row]),
                                               file_index=int(episodes[f"videos/{feature}/file_index"][row]))
            if path not in decoded:
                pictures, times = decode_video(path)
                decoded[path] = dict(zip(np.rint(times * fps).astype(int).tolist(), pictures))
            by_frame = decoded[path]
            first = int(round(float(episodes[f"videos/{feature}/from_timestamp"][row]) * fps))
            start, end = buffer.episode_starts[i], buffer.episode_ends[i]
            wanted = range(first, first + end - start)
            lost = [f for f in wanted if f not in by_frame]
            if lost:
                raise DataError(f"{path}: episode {episode} needs frames {first}..{first + end - start - 1} at {fps} fps; "
                                f"{len(lost)} are not in the video (first {lost[0]})")
            out[start:end] = torch.from_numpy(np.stack([by_frame[f] for f in wanted])).permute(0, 3, 1, 2)
        return out

    def _parquet_images(self, buffer: ReplayBuffer, key: str) -> torch.Tensor:
        feature = self.keys[key]
        cells = read_parquet_rows(self._files("data/*/*.parquet"), columns=[feature])[feature][self._order]
        out = torch.empty((buffer.num_steps, *self.env_image_shapes[key]), dtype=torch.uint8)
        for row, cell in enumerate(cells):
            frame = decode_image(cell, f"{self.root}/data: {feature} of frame {row}")
            if (3, *frame.shape[:2]) != tuple(out.shape[1:]):
                raise DataError(f"{self.root}/data: {feature} of frame {row} is {frame.shape[0]}x{frame.shape[1]}; "
                                f"meta/info.json says {tuple(out.shape[2:])}")
            out[row] = torch.from_numpy(frame).permute(2, 0, 1)
        return out

    def policy_spec(self) -> dict:
        """With LeRobot's feature names, so the policy also takes observations keyed as LeRobot's are."""
        return {**super().policy_spec(), "feature_keys": dict(self.keys)}

    def fit_normalizers(self) -> None:
        if self.normalizer == "fit":
            return super().fit_normalizers()
        stats_path = self.root / "meta" / "stats.json"
        if not stats_path.is_file():
            raise MissingFileError(f"data.normalizer=stats needs {stats_path}; use data.normalizer=fit")
        stats = json.loads(stats_path.read_text())

        def min_max(features: list[str]) -> MinMaxNormalizer:
            low = np.concatenate([np.asarray(stats[f]["min"], dtype=np.float32).ravel() for f in features])
            high = np.concatenate([np.asarray(stats[f]["max"], dtype=np.float32).ravel() for f in features])
            return MinMaxNormalizer(low, high)

        self.buffer()
        self.obs_normalizer = min_max([self.keys[k] for k in self.low_keys])
        self.action_normalizer = min_max([self.action_key])
