"""Write a small LeRobotDataset in the v3.0 layout (what LeRobot writes), for the reader's tests: two data parquet
files, several episodes per video file (so from_timestamp matters), AV1 video as LeRobot's default."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_video(path: Path, frames: np.ndarray, fps: int, codec: str = "libsvtav1") -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10"} if codec == "libsvtav1" else {"crf": "0"}
        for picture in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def png(frame: np.ndarray) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(frame).save(out, format="PNG")
    return out.getvalue()


def write_lerobot(root: Path, episodes: list[dict], fps: int = 10, episodes_per_video: int = 2,
                  episodes_per_data_file: int = 2, use_videos: bool = True) -> Path:
    """episodes: dicts with 'state' (T, S), 'action' (T, A) and 'image' (T, H, W, 3) uint8, optionally 'env_state'
    (T, E) as observation.environment_state. use_videos=False stores the frames as PNG in the data parquet (Hugging
    Face's Image feature, a struct of bytes and path), as LeRobot's `use_videos=False` does, with no video_path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    lengths = [len(e["action"]) for e in episodes]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    h, w = episodes[0]["image"].shape[1:3]
    features = {
        "observation.state": {"dtype": "float32", "shape": [episodes[0]["state"].shape[1]], "names": None},
        "action": {"dtype": "float32", "shape": [episodes[0]["action"].shape[1]], "names": None},
        "observation.image": {"dtype": "video", "shape": [h, w, 3], "names": ["height", "width", "channels"],
                              "info": {"video.fps": fps, "video.codec": "av1", "video.pix_fmt": "yuv420p"}}
        if use_videos else {"dtype": "image", "shape": [h, w, 3], "names": ["height", "width", "channels"]},
        **{k: {"dtype": "int64", "shape": [1], "names": None} for k in ("frame_index", "episode_index", "index", "task_index")},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    }
    info = {"codebase_version": "v3.0", "fps": fps, "total_episodes": len(episodes), "total_frames": int(sum(lengths)),
            "chunks_size": 1000, "splits": {"train": f"0:{len(episodes)}"}, "features": features,
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4" if use_videos else None}
    if "env_state" in episodes[0]:
        features["observation.environment_state"] = {"dtype": "float32", "shape": [episodes[0]["env_state"].shape[1]], "names": None}
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=2))

    rows = []
    for first in range(0, len(episodes), episodes_per_data_file):
        group = range(first, min(first + episodes_per_data_file, len(episodes)))
        table = {"observation.state": [], "action": [], "timestamp": [], "frame_index": [], "episode_index": [], "index": [], "task_index": []}
        table |= {"observation.environment_state": []} if "env_state" in episodes[0] else {}
        table |= {} if use_videos else {"observation.image": []}
        for i in group:
            for t in range(lengths[i]):
                if "env_state" in episodes[0]:
                    table["observation.environment_state"].append(episodes[i]["env_state"][t].astype(np.float32).tolist())
                if not use_videos:
                    table["observation.image"].append({"bytes": png(episodes[i]["image"][t]), "path": f"frame_{int(starts[i] + t):06d}.png"})
                table["observation.state"].append(episodes[i]["state"][t].astype(np.float32).tolist())
                table["action"].append(episodes[i]["action"][t].astype(np.float32).tolist())
                table["timestamp"].append(t / fps)
                table["frame_index"].append(t)
                table["episode_index"].append(i)
                table["index"].append(int(starts[i] + t))
                table["task_index"].append(0)
        path = root / "data" / "chunk-000" / f"file-{first // episodes_per_data_file:03d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(table), path)

    for first in range(0, len(episodes), episodes_per_video):
        group = list(range(first, min(first + episodes_per_video, len(episodes))))
        file_index = first // episodes_per_video
        if not use_videos:
            rows += [{"episode_index": i, "length": lengths[i], "tasks": ["push the T"], "data/chunk_index": 0,
                      "data/file_index": i // episodes_per_data_file, "dataset_from_index": int(starts[i]),
                      "dataset_to_index": int(starts[i] + lengths[i])} for i in group]
            continue
        write_video(root / "videos" / "observation.image" / "chunk-000" / f"file-{file_index:03d}.mp4",
                    np.concatenate([episodes[i]["image"] for i in group]), fps)
        offset = 0
        for i in group:
            rows.append({"episode_index": i, "length": lengths[i], "tasks": ["push the T"],
                         "data/chunk_index": 0, "data/file_index": i // episodes_per_data_file,
                         "dataset_from_index": int(starts[i]), "dataset_to_index": int(starts[i] + lengths[i]),
                         "videos/observation.image/chunk_index": 0, "videos/observation.image/file_index": file_index,
                         "videos/observation.image/from_timestamp": offset / fps,
                         "videos/observation.image/to_timestamp": (offset + lengths[i]) / fps})
            offset += lengths[i]
    path = root / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)

    every = {"observation.state": np.concatenate([e["state"] for e in episodes]), "action": np.concatenate([e["action"] for e in episodes])}
    stats = {k: {"min": v.min(0).tolist(), "max": v.max(0).tolist(), "mean": v.mean(0).tolist(), "std": v.std(0).tolist(),
                 "count": [len(v)]} for k, v in every.items()}
    (root / "meta" / "stats.json").write_text(json.dumps(stats))
    return root
