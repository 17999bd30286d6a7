"""Draw samples from a checkpoint with its EMA weights:

    python sample.py ckpt_path=PATH num_samples=64 sampler=ddim steps=50
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from callbacks.visualize import save_png
from lightning_modules.checkpoint import instantiate_datamodule, load_module, sampling_options, sampling_tag


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
def main(cfg: DictConfig) -> Path:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    module, ckpt = load_module(cfg.ckpt_path, map_location=device)
    datamodule = instantiate_datamodule(module.run_config)
    sampler = cfg.sampler or getattr(module, "sampler", None)
    steps = cfg.steps or getattr(module, "sample_steps", None)
    kwargs = {"sampler": cfg.sampler, "steps": cfg.steps}
    if cfg.eta is not None:
        kwargs["eta"] = cfg.eta
    kwargs.update(sampling_options(cfg))

    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    start = time.perf_counter()
    x = module.sample_many(cfg.num_samples, cfg.batch_size, generator, progress=cfg.progress, **kwargs)
    seconds = time.perf_counter() - start
    nfe = module.nfe(cfg.sampler, cfg.steps)  # after sampling: adaptive ODE solvers know their NFE only then
    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path(cfg.ckpt_path).resolve().parent.parent / "samples" / f"{sampler}_{nfe}nfe{sampling_tag(cfg)}"

    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out_dir / "samples.npz",
        samples=datamodule.unnormalize(x).numpy(),
        sampler=str(sampler), steps=int(steps or 0), nfe=nfe, global_step=int(ckpt.get("global_step", -1)),
    )
    shown = x[:256] if datamodule.data_kind == "image" else x
    png = save_png(datamodule.render(shown), out_dir / "samples.png")
    print(f"{len(x)} samples in {seconds:.1f}s ({len(x) / seconds:.1f} samples/s) -> {out_dir / 'samples.npz'} and {png}")
    return out_dir


if __name__ == "__main__":
    main()
