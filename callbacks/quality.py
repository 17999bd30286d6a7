"""Log the datamodule's sample-quality figure (digits Frechet distance, toy sliced W1) during training."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only

from callbacks.ema import ema_weights


class QualityMetric(pl.Callback):
    """Every `every_n_val` validations, sample `num_samples` with the EMA weights and log `quality/<metric>`."""

    def __init__(self, num_samples: int = 512, every_n_val: int = 2, sampler: str | None = None, steps: int | None = None, seed: int = 1):
        self.num_samples = num_samples
        self.every_n_val = every_n_val
        self.sampler = sampler
        self.steps = steps
        self.seed = seed
        self._metric = None
        self._val_count = 0

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or getattr(pl_module, "cond_dim", None) is not None:
            return
        self._val_count += 1
        if self._val_count % self.every_n_val == 0:
            self._measure(trainer, pl_module)

    @rank_zero_only
    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._metric is None:
            self._metric = trainer.datamodule.make_metric()
            if self._metric is None:
                return
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        with ema_weights(trainer, pl_module):
            x = pl_module.sample(self.num_samples, sampler=self.sampler, steps=self.steps, generator=generator)
        value = self._metric(x)
        for logger in trainer.loggers:
            logger.log_metrics({f"quality/{self._metric.name}": value}, step=trainer.global_step)
