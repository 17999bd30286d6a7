"""Training cost per step of the exposure-bias variants against plain DDPM, measured in one process.

    python benchmarks/step_cost.py                 # digits (unet_small, batch 128), p = 0.8 and 0.4
    python benchmarks/step_cost.py --data toy2d --p 0.8

Each variant is built from the same configs `train.py` composes (data defaults, net, optimizer) and takes
`--steps` optimizer steps (loss, backward, Adam) per round; rounds rotate the order of the variants and the
median seconds per step over rounds is reported with its ratio to the baseline of the same run, so machine load
shifts all rows together. Scheduled sampling is timed at a fixed roll-back probability p (p_start = p_end = p):
0.8 is the end of the default schedule, 0.4 its mean over training.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from lightning_modules.checkpoint import build_model

ROOT = Path(__file__).resolve().parents[1]
DATA = {"digits": ["data=digits"], "toy2d": ["data=toy2d", "data.name=swiss_roll"]}
VARIANTS = {
    "baseline": ["model=ddpm"],
    "input_perturbation": ["model=ddpm", "model.input_perturbation=0.1"],
    "ss_renoise": ["model=scheduled_sampling", "model.ss_rollback=renoise"],
    "ss_ancestral": ["model=scheduled_sampling", "model.ss_rollback=ancestral", "model.sampling.options.variance=posterior"],
    "ss_sampler_step": ["model=scheduled_sampling", "model.ss_rollback=sampler_step", "model.sampling.steps=10"],
}


def build(data: list[str], overrides: list[str], p: float):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        ss = [f"model.p_start={p}", f"model.p_end={p}", "model.total_steps=1"] if "model=scheduled_sampling" in overrides else []
        cfg = compose(config_name="train", overrides=[*overrides, *data, *ss])
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    module = build_model(cfg, datamodule.data_shape, datamodule.cond_dim)
    module.train()
    batch = next(iter(datamodule.train_dataloader()))
    optimizer = instantiate(cfg.model.optimizer)(module.parameters())
    return module, batch, optimizer


def step_seconds(module, batch, optimizer, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        module.loss(batch).backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=sorted(DATA), default="digits")
    parser.add_argument("--p", type=float, nargs="+", default=[0.8, 0.4], help="roll-back probabilities to time")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    for p in args.p:
        built = {name: build(DATA[args.data], overrides, p) for name, overrides in VARIANTS.items()}
        for module, batch, optimizer in built.values():
            step_seconds(module, batch, optimizer, 2)  # warm-up: allocator, oneDNN kernels
        times: dict[str, list[float]] = {name: [] for name in built}
        names = list(built)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                times[name].append(step_seconds(*built[name], args.steps))
        base = statistics.median(times["baseline"])
        print(f"\n{args.data}, p = {p}, {torch.get_num_threads()} threads, {args.rounds} rounds x {args.steps} steps")
        print("| variant | s/step (median) | ratio to baseline | forwards per step (expected) |")
        print("| --- | ---: | ---: | ---: |")
        for name in names:
            med = statistics.median(times[name])
            forwards = 1 + p if name.startswith("ss_") else 1
            print(f"| {name} | {med:.4f} | {med / base:.3f} | {forwards:.2f} |")


if __name__ == "__main__":
    main()
