"""EMA of the weights through Lightning's WeightAveraging, with a decay warm-up.

With a fixed decay of 0.9999 a short run would sample from weights that are
mostly the random initialisation; the warm-up decay min(decay, (1+n)/(10+n))
(n = updates so far) lets the average follow the model early on.
Lightning's callback already swaps the average in for validation, saves it as
the checkpoint's `state_dict` (so sampling from a checkpoint uses EMA weights)
and restores both copies on resume.
"""

from __future__ import annotations

import contextlib

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import WeightAveraging
from difflab.errors import ConfigError


class EMA(WeightAveraging):
    def __init__(self, decay: float = 0.9999, warmup: bool = True, update_every_n_steps: int = 1, start_step: int = 0):
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"EMA decay must be in [0, 1), got {decay}")
        super().__init__(use_buffers=True, multi_avg_fn=self._lerp)
        self.decay = decay
        self.warmup = warmup
        self.update_every_n_steps = update_every_n_steps
        self.start_step = start_step
        self._decay_now = decay
        self.swapped_in = False

    def decay_at(self, num_updates: int) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + num_updates) / (10 + num_updates))

    def _lerp(self, averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        # One fused call per dtype/device group; the decay is a Python float, so no device sync. Integer and
        # boolean buffers (attention masks, counters) cannot be averaged: the average takes their current value.
        floats = [i for i, a in enumerate(averaged) if a.is_floating_point()]
        if len(floats) < len(averaged):
            for i in set(range(len(averaged))) - set(floats):
                averaged[i].copy_(current[i])
            averaged, current = [averaged[i] for i in floats], [current[i] for i in floats]
        if averaged:
            torch._foreach_lerp_(averaged, current, 1.0 - self._decay_now)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        if step_idx is None:
            return False
        return step_idx >= self.start_step and step_idx % self.update_every_n_steps == 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        num_updates = max(trainer.global_step - 1 - self.start_step, 0) // self.update_every_n_steps
        self._decay_now = self.decay_at(num_updates)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning copies the average into the module here, before the checkpoint callback's own on_train_end
        # (ModelCheckpoint always runs last), which would then store the EMA weights as the raw ones. Copy at
        # on_fit_end instead: every checkpoint is written by then, and the module still ends holding the EMA.
        pass

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._average_model is not None:
            self._copy_average_to_current(pl_module)

    def _swap_models(self, pl_module: pl.LightningModule) -> None:
        super()._swap_models(pl_module)
        self.swapped_in = not self.swapped_in

    @contextlib.contextmanager
    def average_weights(self, pl_module: pl.LightningModule):
        """The EMA weights in pl_module for the duration, whatever the callback order."""
        if self._average_model is None or self.swapped_in:
            yield
            return
        self._swap_models(pl_module)
        try:
            yield
        finally:
            self._swap_models(pl_module)


@contextlib.contextmanager
def ema_weights(trainer: pl.Trainer, pl_module: pl.LightningModule):
    """Use the EMA weights if the trainer has an EMA callback, else the weights as they are."""
    ema = next((cb for cb in trainer.callbacks if isinstance(cb, EMA)), None)
    if ema is None:
        yield
    else:
        with ema.average_weights(pl_module):
            yield
