"""Seconds per training step with 1 and with 2 torch threads, on an idle machine and beside a busy process.

    python benchmarks/cpu_threads.py                      # digits, toy2d and pusht (state), 1 vs 2 threads
    python benchmarks/cpu_threads.py --configs digits --rounds 7

Each config is built from the same configs `train.py` composes (data defaults, net, optimizer) and takes
`--steps` optimizer steps (loss, backward, Adam) per round; rounds alternate the thread counts, and the median
seconds per step over rounds is reported with the ratio 2 threads / 1 thread of the same run. "loaded" runs the
same rounds while one other process spins on a core, as a second training or a test run would: what decides the
default of `speed.cpu_threads` (train.py) on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from benchmarks.step_cost import step_seconds  # noqa: E402
from lightning_modules.checkpoint import build_model  # noqa: E402

PUSHT = os.environ.get("PUSHT_ZARR", str(ROOT.parent / "shared" / "data" / "pusht" / "pusht_cchi_v7_replay.zarr"))
CONFIGS = {
    "digits": ["data=digits"],
    "toy2d": ["data=toy2d"],
    "pusht": ["experiment=pusht_ddpm", f"data.path={PUSHT}"],
}


def build(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    module = build_model(cfg, datamodule.data_shape, datamodule.cond_dim).train()
    batch = next(iter(datamodule.train_dataloader()))
    optimizer = instantiate(cfg.model.optimizer)(module.parameters())
    params = sum(p.numel() for p in module.net.parameters())
    return module, batch, optimizer, params


def spin() -> None:
    while True:
        pass


def measure(built, steps: int, rounds: int) -> dict[int, float]:
    times: dict[int, list[float]] = {1: [], 2: []}
    for r in range(rounds):
        for threads in ((1, 2) if r % 2 == 0 else (2, 1)):
            torch.set_num_threads(threads)
            times[threads].append(step_seconds(*built[:3], steps))
    return {t: statistics.median(v) for t, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"{args.rounds} rounds x {args.steps} steps, median s/step")
    print("| config | net params | state | 1 thread | 2 threads | 2 / 1 |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for name in args.configs:
        built = build(CONFIGS[name])
        torch.set_num_threads(2)
        step_seconds(*built[:3], 3)  # warm-up: allocator, oneDNN kernels
        for state in ("idle", "loaded"):
            busy = mp.get_context("spawn").Process(target=spin, daemon=True) if state == "loaded" else None
            if busy is not None:
                busy.start()
                time.sleep(1.0)
            try:
                median = measure(built, args.steps, args.rounds)
            finally:
                if busy is not None:
                    busy.terminate()
                    busy.join()
            print(f"| {name} | {built[3] / 1e6:.2f}M | {state} | {median[1]:.4f} | {median[2]:.4f} | {median[2] / median[1]:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
