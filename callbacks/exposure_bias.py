"""Exposure bias at validation: what the sampler visits against q(x_t | x0), logged as scalars and a curve.

Runs only for DDPM-family models (they expose a discrete schedule and eps); the
quality callback logs its figure beside it, because a variance gap alone rewards
samplers that collapse.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import default_collate

from callbacks.ema import ema_weights
from callbacks.periodic import EveryNValidations
from callbacks.sample_logger import log_image
from difflab.pictures import agg_figure, figure_rgb, save_png


def exposure_curve(result: dict, title: str = "") -> np.ndarray:
    """sampler vs forward variance (left) and the denoiser's x0 error on both inputs (right), against t."""
    t = result["t"].numpy()
    fig = agg_figure((8, 3))
    left, right = fig.subplots(1, 2)
    left.plot(t, result["q_var"].numpy(), label="q(x_t|x0): 1 - abar_t")
    left.plot(t, result["sampler_var"].numpy(), label="sampler", linestyle="--")
    left.set_xlabel("t")
    left.set_title(f"per-sample variance about sqrt(abar) x0 (delta_sum {result['delta_sum']:.3g})", fontsize=8)
    left.legend(fontsize=7)
    right.plot(t, result["err_forward"].numpy(), label="forward-noised input")
    right.plot(t, result["err_sampler"].numpy(), label="sampler-made input", linestyle="--")
    right.set_yscale("log")
    right.set_xlabel("t")
    right.set_title("denoiser's x0 error", fontsize=8)
    right.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return figure_rgb(fig)


class ExposureBias(EveryNValidations):
    """Every `every_n_val` validations: exposure/delta_sum, exposure/mean_ratio and the curve, on `num_samples`
    held-out examples with the EMA weights. Skipped for methods without a discrete schedule."""

    def __init__(self, num_samples: int = 128, every_n_val: int = 1, sampler: str | None = None, steps: int | None = None, seed: int = 3):
        super().__init__(every_n_val)
        self.num_samples = num_samples
        self.sampler, self.steps, self.seed = sampler, steps, seed

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if hasattr(pl_module, "schedule") and self.due(trainer):
            self._measure(trainer, pl_module)

    @rank_zero_only
    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_modules.exposure_bias import measure_exposure_bias

        dataset = trainer.datamodule.dataset("val")
        # Item by item: image datasets index one example at a time (the in-memory ones also take a tensor).
        batch = default_collate([dataset[i] for i in range(min(self.count(trainer, self.num_samples), len(dataset)))])
        x0 = batch["x"].to(pl_module.device)
        cond = batch.get("cond")
        sampling = self.sampling(trainer, pl_module, self.sampler, self.steps)
        sampler = sampling.get("sampler") or pl_module.sampler
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        with ema_weights(trainer, pl_module):
            if cond is not None:  # camera frames go through the (EMA) observation encoder once, like a policy's
                with torch.no_grad():
                    cond = pl_module.encode_cond(move_data_to_device(cond, pl_module.device))
            result = measure_exposure_bias(pl_module, x0, sampler, sampling.get("steps"), generator, cond=cond)
        for logger in trainer.loggers:
            logger.log_metrics({"exposure/delta_sum": result["delta_sum"], "exposure/mean_ratio": result["mean_ratio"],
                                "exposure/mean_gap": result["mean_gap"]}, step=trainer.global_step)
        image = exposure_curve(result, f"{sampler}, {result['nfe']} NFE, step {trainer.global_step}")
        log_image(trainer, "exposure/curve", image, trainer.global_step)
        save_png(image, Path(trainer.default_root_dir) / "exposure" / f"step_{trainer.global_step:07d}.png")
