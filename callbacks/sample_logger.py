"""Draw samples with the EMA weights at validation and log them as images (TensorBoard + PNG files)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only

from callbacks.ema import ema_weights
from callbacks.periodic import EveryNValidations
from datamodules.base import one_hot, sampling_cond
from difflab.pictures import save_png


def log_image(trainer: pl.Trainer, tag: str, image, step: int) -> None:
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image(tag, image, step, dataformats="HWC")


class SampleLogger(EveryNValidations):
    """Every `every_n_val` validations: a grid/scatter of `num_samples` from fixed noise (so frames are comparable)."""

    def __init__(self, num_samples: int = 64, every_n_val: int = 1, sampler: str | None = None, steps: int | None = None, seed: int = 0):
        super().__init__(every_n_val, first=True)
        self.num_samples = num_samples
        self.sampler = sampler
        self.steps = steps
        self.seed = seed

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(trainer.datamodule, "cond_kind", None) == "observations":  # a policy: the rollout callback draws it
            return
        if self.due(trainer):
            self._draw(trainer, pl_module)

    @rank_zero_only
    def _draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        datamodule, n = trainer.datamodule, self.count(trainer, self.num_samples)
        cond, layout = None, {}
        kind = getattr(datamodule, "cond_kind", None)
        if kind == "labels":  # one row per class
            per_class = max(n // datamodule.num_classes, 1)
            labels = torch.arange(datamodule.num_classes).repeat_interleave(per_class)
            cond, n, layout = one_hot(labels, datamodule.num_classes).to(pl_module.device), len(labels), {"nrow": per_class}
            if datamodule.data_kind == "points":  # a scatter: the points coloured by class
                layout["labels"] = labels
        elif kind == "attributes":  # multi-label: the first n validation images' attribute vectors
            cond = sampling_cond(datamodule, n)[1].to(pl_module.device)
        with ema_weights(trainer, pl_module):
            x = pl_module.sample(n, cond=cond, generator=generator, **self.sampling(trainer, pl_module, self.sampler, self.steps))
        image = datamodule.render(x, **layout)
        log_image(trainer, "samples", image, trainer.global_step)
        out_dir = Path(trainer.default_root_dir) / "samples"
        save_png(image, out_dir / f"step_{trainer.global_step:07d}.png")
