"""Is a resumed run bitwise the run it interrupted?  `python benchmarks/resume_exactness.py [--data toy2d]`

Trains `--steps` steps straight, and `--split` steps then a resume to `--steps`, with train.py as a user runs it
(one CPU thread each), and compares every tensor of the two final checkpoints: the raw weights, the EMA weights
and the optimizer state. Prints the largest difference and how many tensors are bitwise equal.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = {
    "toy2d": ["data=toy2d", "data.num_train=2000", "model.num_timesteps=100"],
    "digits": ["data=digits", "net.ch=16", "net.num_res_blocks=1", "model.num_timesteps=100"],
    "obstacle2d": ["data=obstacle2d", "data.num_episodes=20", "net=unet1d_tiny", "callbacks.rollout.every_n_val=0"],
}
QUIET = ["callbacks.sample_logger=null", "callbacks.quality=null", "callbacks.exposure_bias=null", "final_eval.num_samples=16",
         "final_eval.num_episodes=1", "logger=csv"]


def train(run_dir: Path, *overrides: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")


def tensors(ckpt: dict) -> dict[str, torch.Tensor]:
    out = {f"ema/{k}": v for k, v in ckpt["state_dict"].items()}
    out |= {f"raw/{k}": v for k, v in ckpt.get("current_model_state", {}).items()}
    for i, state in ckpt["optimizer_states"][0]["state"].items():
        out |= {f"adam/{i}/{k}": v for k, v in state.items() if torch.is_tensor(v)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=sorted(DATA), default="toy2d")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--split", type=int, default=17, help="steps before the interruption (mid-epoch unless it divides the epoch)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    common = [*DATA[args.data], *QUIET, f"seed={args.seed}", "trainer.log_every_n_steps=1"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train(tmp / "straight", *common, f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.split}")
        train(tmp / "first", *common, f"trainer.max_steps={args.split}", f"trainer.val_check_interval={args.split}")
        train(tmp / "resumed", *common, f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.split}",
              f"ckpt_path={tmp / 'first' / 'checkpoints' / 'last.ckpt'}")
        a = tensors(torch.load(tmp / "straight" / "checkpoints" / "last.ckpt", weights_only=False))
        b = tensors(torch.load(tmp / "resumed" / "checkpoints" / "last.ckpt", weights_only=False))
    assert a.keys() == b.keys(), "the checkpoints hold different tensors"
    equal = sum(torch.equal(a[k], b[k]) for k in a)
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    print(f"{args.data}: {args.split} + resume to {args.steps} steps against {args.steps} straight (seed {args.seed}): "
          f"{equal}/{len(a)} tensors bitwise equal, largest difference {worst:.3g}")


if __name__ == "__main__":
    main()
