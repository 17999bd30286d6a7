"""Quality figure of a checkpoint, with its floor, sampler, NFE and speed, printed and written as JSON:

    python evaluate.py ckpt_path=PATH [metric=auto] [num_samples=2000] [sampler=ddim] [steps=50]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from lightning_modules.checkpoint import instantiate_datamodule, load_module

DEFAULT_NUM_SAMPLES = {"fid": 50_000}


def make_metric(name: str, datamodule, cfg: DictConfig, device: str):
    """The datamodule's own figure for `auto`; FID can be asked for explicitly on image data."""
    if name == "auto":
        if getattr(datamodule, "fid_name", None):
            name = "fid"
        else:
            metric = datamodule.make_metric()
            if metric is None:
                raise ValueError(f"{type(datamodule).__name__} has no quality metric: pass metric=... explicitly")
            return metric
    if name == "fid":
        from evaluation.fid import InceptionFID

        if not getattr(datamodule, "fid_name", None):
            raise ValueError(f"metric=fid needs an image dataset with real images; {type(datamodule).__name__} has none")
        datamodule.setup("fit")
        return InceptionFID(datamodule, inception_weights=cfg.inception_weights, device=device)
    metric = datamodule.make_metric()
    if metric is None or metric.name != name:
        have = metric.name if metric is not None else "none"
        raise ValueError(f"metric={name!r} is not available for {type(datamodule).__name__} (it has: auto, {have}, and fid for images)")
    return metric


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> dict:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    module, ckpt = load_module(cfg.ckpt_path, map_location=device)
    datamodule = instantiate_datamodule(module.run_config)
    metric = make_metric(cfg.metric, datamodule, cfg, device)
    num_samples = cfg.num_samples or DEFAULT_NUM_SAMPLES.get(metric.name, 2000)
    sampler = cfg.sampler or getattr(module, "sampler", None)
    kwargs = {"sampler": cfg.sampler, "steps": cfg.steps, **({"eta": cfg.eta} if cfg.eta is not None else {})}
    nfe = module.nfe(cfg.sampler, cfg.steps)

    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    start = time.perf_counter()
    x = module.sample_many(num_samples, cfg.batch_size, generator, progress=cfg.progress, **kwargs)
    seconds = time.perf_counter() - start
    value = float(metric(x))
    result = {
        "checkpoint": str(cfg.ckpt_path),
        "global_step": int(ckpt.get("global_step", -1)),
        "metric": metric.name,
        "value": value,
        "floor": float(metric.floor(x.shape[0])),
        "num_samples": num_samples,
        "sampler": sampler,
        "steps": cfg.steps or getattr(module, "sample_steps", None),
        "nfe": nfe,
        "sampling_seconds": round(seconds, 3),
        "samples_per_second": round(num_samples / max(seconds, 1e-9), 2),
        "device": device,
    }
    out = Path(cfg.out) if cfg.out else Path(cfg.ckpt_path).resolve().parent.parent / "eval" / f"{metric.name}_{sampler}_{nfe}nfe.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{metric.name} = {value:.4g} (floor {result['floor']:.4g}) from {num_samples} samples, {sampler} with {nfe} NFE, "
          f"{result['samples_per_second']} samples/s on {device} -> {out}")
    return result


if __name__ == "__main__":
    main()
