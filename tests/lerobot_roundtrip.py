"""Run by an interpreter with lerobot installed (tests/test_lerobot_export.py starts it): load our exported folder
with LeRobot's own loader and processors, act on the recorded observations with the recorded noise, and print
the largest difference to our actions as JSON. Imports nothing of this project.

    python tests/lerobot_roundtrip.py <exported folder> <recording.npz>
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from safetensors.torch import load_file


def main(folder: str, recording: str) -> None:
    import lerobot
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
    from lerobot.policies.factory import make_pre_post_processors

    policy = DiffusionPolicy.from_pretrained(folder).eval()
    # from_pretrained logs and goes on when names do not match; a strict load proves every tensor is ours
    policy.load_state_dict(load_file(f"{folder}/model.safetensors"), strict=True)
    pre, post = make_pre_post_processors(policy.config, pretrained_path=folder)  # what LeRobot's own eval does
    data = np.load(recording)
    features = [str(f) for f in data["features"]]
    ours, got = data["actions"], []
    for episode in range(ours.shape[0]):
        policy.reset()
        for step in range(ours.shape[1]):
            obs = {f: torch.from_numpy(data[f][episode, step]).float()[None] for f in features}
            chunk = step // int(data["n_action_steps"])
            if step % int(data["n_action_steps"]) == 0:
                torch.manual_seed(int(data["seeds"][episode, chunk]))  # DDPM's step noise comes from the global RNG
            noise = torch.from_numpy(data["noise"][episode, chunk])[None] if data["noise"].size else None
            action = post(policy.select_action(pre(obs), noise=noise))
            got.append(action.reshape(-1).numpy())
    got = np.stack(got).reshape(ours.shape)
    print(json.dumps({"lerobot": lerobot.__version__, "max_abs_diff": float(np.abs(got - ours).max()),
                      "max_abs_action": float(np.abs(ours).max()), "tensors": len(policy.state_dict())}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
