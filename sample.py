"""Draw samples from a checkpoint with its EMA weights:

    python sample.py ckpt_path=PATH num_samples=64 sampler=ddim steps=50
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from difflab.pictures import save_png
from datamodules.base import one_hot, sampling_cond
from difflab.cli import entry_keys, one_line_errors, refuse_training_groups, requested_labels, writable_dir
from difflab.config_checks import check_config, check_known_keys
from difflab.errors import SAMPLER_DIVERGED, ConfigError, require_finite
from lightning_modules.checkpoint import instantiate_datamodule, load_guide, load_module, sampling_options, sampling_tag

SAMPLE_HINT = "Sampler settings for this call are sampler=, steps= and any option the sampler takes (s_churn=40, eta=1, ...). "


def policy_error(path) -> ConfigError:
    return ConfigError(
        f"{path} is a policy (trained on demonstrations): its samples are action chunks given observations, which "
        f"sample.py has none of. Score it closed-loop with `python evaluate.py ckpt_path={path} metric=policy`, or act "
        "with `from envs.policy import load_policy; policy, datamodule = load_policy(path)` (README: Diffusion policies)"
    )


def guide_tag(cfg: DictConfig) -> str:
    return f"_guide-{Path(cfg.guide_ckpt).parent.parent.name}-{Path(cfg.guide_ckpt).stem}" if cfg.get("guide_ckpt") else ""


def sampling_kwargs(cfg: DictConfig, module) -> dict:
    """The sampler options of this call (and autoguidance's guide), after the method refused any it does not take."""
    kwargs = sampling_options(cfg)
    if cfg.get("guide_ckpt"):
        kwargs["guide"] = load_guide(cfg.guide_ckpt, module, module.device)
    module.check_sampling(cfg.sampler, steps=cfg.steps, **kwargs)
    return {"sampler": cfg.sampler, "steps": cfg.steps, **kwargs}


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
@one_line_errors
def main(cfg: DictConfig) -> Path:
    check_known_keys(cfg, entry_keys("sample"), "sample", SAMPLE_HINT)
    check_config(cfg, "sample")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    module, ckpt = load_module(cfg.ckpt_path, map_location=device)
    datamodule = instantiate_datamodule(module.run_config)
    if datamodule.data_kind == "trajectory":
        raise policy_error(cfg.ckpt_path)
    kwargs = sampling_kwargs(cfg, module)
    sampler = cfg.sampler or getattr(module, "sampler", None)
    steps = cfg.steps or getattr(module, "sample_steps", None)
    samples_root = Path(cfg.ckpt_path).resolve().parent.parent / "samples"
    writable_dir(cfg.out_dir or samples_root, "out_dir" if cfg.out_dir else f"the default out_dir ({samples_root}); set out_dir=")

    labels, num_samples, layout = requested_labels(
        OmegaConf.to_container(cfg.labels) if OmegaConf.is_config(cfg.labels) else cfg.labels, cfg.num_samples, datamodule, cfg.ckpt_path)
    cond = None if labels is None else one_hot(labels, datamodule.num_classes).to(device)
    if getattr(datamodule, "cond_kind", None) == "attributes":  # multi-label: the validation images' vectors in turn
        cond = sampling_cond(datamodule, num_samples)[1].to(device)

    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    start = time.perf_counter()
    x, nfe = module.sample_many(num_samples, cfg.batch_size, generator, cond=cond, progress=cfg.progress, return_nfe=True, **kwargs)
    seconds = time.perf_counter() - start
    require_finite(x, f"the samples of sampler={sampler} ({nfe} NFE)", SAMPLER_DIVERGED)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else samples_root / f"{Path(cfg.ckpt_path).stem}_{sampler}_{nfe}nfe{sampling_tag(cfg)}{guide_tag(cfg)}"

    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out_dir / "samples.npz",
        samples=datamodule.unnormalize(x).numpy(),
        sampler=str(sampler), steps=int(steps or 0), nfe=nfe, global_step=int(ckpt.get("global_step", -1)),
        **({} if labels is None else {"labels": labels.numpy()}),
    )
    shown = x if layout else (x[:256] if datamodule.data_kind == "image" else x)
    if labels is not None and datamodule.data_kind == "points":  # a scatter coloured by each sample's class
        layout = {**layout, "labels": labels[: len(shown)]}
    png = save_png(datamodule.render(shown, **layout), out_dir / "samples.png")
    print(f"{len(x)} samples in {seconds:.1f}s ({len(x) / seconds:.1f} samples/s) -> {out_dir / 'samples.npz'} and {png}")
    return out_dir


if __name__ == "__main__":
    refuse_training_groups("sample", SAMPLE_HINT)  # then key=value pairs of no setting here become sampler options
    main()
