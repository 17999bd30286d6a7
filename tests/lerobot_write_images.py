"""Run by an interpreter with lerobot installed (tests/test_lerobot_export.py starts it): write a LeRobotDataset
with lerobot's own writer, frames stored as images (use_videos=False), and the arrays it was written from.

    python tests/lerobot_write_images.py <dataset folder> <truth.npz>
"""

from __future__ import annotations

import sys

import numpy as np


def main(root: str, truth: str) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    features = {
        "observation.state": {"dtype": "float32", "shape": (2,), "names": None},
        "observation.image": {"dtype": "image", "shape": (96, 96, 3), "names": ["height", "width", "channels"]},
        "action": {"dtype": "float32", "shape": (2,), "names": None},
    }
    dataset = LeRobotDataset.create(repo_id="local/pusht_images", root=root, fps=10, features=features, use_videos=False)
    rng = np.random.default_rng(0)
    frames, states, actions = [], [], []
    for length in (7, 5, 9):
        for _ in range(length):
            frame = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
            state, action = rng.uniform(0, 512, 2).astype(np.float32), rng.uniform(0, 512, 2).astype(np.float32)
            dataset.add_frame({"observation.state": state, "observation.image": frame, "action": action, "task": "push the T"})
            frames.append(frame), states.append(state), actions.append(action)
        dataset.save_episode()
    dataset.finalize()
    np.savez(truth, frames=np.stack(frames), states=np.stack(states), actions=np.stack(actions), ends=np.cumsum([7, 5, 9]))


if __name__ == "__main__":
    main(*sys.argv[1:3])
