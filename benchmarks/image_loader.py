"""Where an image policy's training step goes (issue 21): the loader (uint8 frames gathered per batch) against the
model, and inside the model the observation encoder against the denoiser.

    PUSHT_ZARR=... OMP_NUM_THREADS=1 python benchmarks/image_loader.py                    # conv_small and resnet18
    python benchmarks/image_loader.py --encoders resnet18 --overrides net=unet1d_paper    # the paper's widths (GPU)

For each encoder: median milliseconds per step of (a) the loader's next batch, (b) a whole training step (encode,
loss, backward, AdamW step), (c) the same step with the encoder's output computed beforehand without gradients
(the denoiser alone); (b) - (c) is the encoder's share. Writes benchmarks/runs/image_loader.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(encoder: str, overrides: list[str], max_episodes: int | None):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from lightning_modules.checkpoint import build_model

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=pusht_image", f"obs_encoder={encoder}", *overrides,
                                          *([f"data.max_train_episodes={max_episodes}"] if max_episodes else [])])
    datamodule = instantiate(cfg.data)
    model = build_model(cfg, datamodule.data_shape, datamodule.cond_dim, datamodule.obs_spec)
    return cfg, datamodule, model


def time_steps(model, datamodule, steps: int, device: str, encoder_frozen: bool) -> tuple[list[float], list[float]]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.to(device).train()
    loader, loads, computes = iter(datamodule.train_dataloader()), [], []
    for _ in range(steps + 2):  # two warm-up steps
        start = time.perf_counter()
        try:
            batch = next(loader)
        except StopIteration:
            loader = iter(datamodule.train_dataloader())
            batch = next(loader)
        loaded = time.perf_counter()
        batch = {"x": batch["x"].to(device), "cond": {k: v.to(device) for k, v in batch["cond"].items()}}
        if encoder_frozen:  # encoded outside the timed part: what is left is the denoiser's step
            with torch.no_grad():
                batch = model.encoded(batch)
            loaded = time.perf_counter()
        loss = model.loss(model.encoded(batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        loads.append(loaded - start)
        computes.append(time.perf_counter() - loaded)
    return loads[2:], computes[2:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", default="conv_small,resnet18")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-train-episodes", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--overrides", nargs="*", default=[])
    args = parser.parse_args()
    rows = {}
    for encoder in args.encoders.split(","):
        cfg, datamodule, model = build(encoder, args.overrides, args.max_train_episodes)
        start = time.perf_counter()
        datamodule.setup()
        setup_s = time.perf_counter() - start
        torch.manual_seed(0)
        loads, steps = time_steps(model, datamodule, args.steps, args.device, encoder_frozen=False)
        _, denoiser = time_steps(model, datamodule, args.steps, args.device, encoder_frozen=True)
        ms = lambda v: round(1000 * statistics.median(v), 2)  # noqa: E731
        rows[encoder] = {
            "batch_size": int(cfg.data.batch_size), "device": args.device, "torch_threads": torch.get_num_threads(),
            "encoder_params_M": round(sum(p.numel() for p in model.obs_encoder.parameters()) / 1e6, 3),
            "denoiser_params_M": round(sum(p.numel() for p in model.net.parameters()) / 1e6, 3),
            "setup_s": round(setup_s, 1), "loader_ms": ms(loads), "step_ms": ms(steps), "denoiser_only_step_ms": ms(denoiser),
            "encoder_share": round(1 - statistics.median(denoiser) / statistics.median(steps), 3),
            "loader_over_step": round(statistics.median(loads) / statistics.median(steps), 4),
        }
        print(encoder, rows[encoder], flush=True)
    out = ROOT / "benchmarks" / "runs" / "image_loader.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
