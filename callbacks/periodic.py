"""What the sampling callbacks share: run every n-th validation, count validations across a resume, and shrink
to a handful of samples and steps under `trainer.fast_dev_run` (users run it to check a config in seconds)."""

from __future__ import annotations

import lightning.pytorch as pl

SMOKE_SAMPLES = 8  # samples (or episodes x 4) a callback draws under fast_dev_run
SMOKE_EPISODE_STEPS = 20


class EveryNValidations(pl.Callback):
    """`due(trainer)` is true at the validations every_n_val, 2 every_n_val, ... (0: never); with first=True at
    the first one too. The count is part of the callback's checkpoint state, so a resumed run keeps the rhythm."""

    def __init__(self, every_n_val: int = 1, first: bool = False):
        self.every_n_val = every_n_val
        self.first = first
        self._val_count = 0

    def due(self, trainer: pl.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        self._val_count += 1
        if trainer.fast_dev_run:
            return True
        if self.every_n_val <= 0:
            return False
        return (self._val_count - 1) % self.every_n_val == 0 if self.first else self._val_count % self.every_n_val == 0

    def sampling(self, trainer: pl.Trainer, pl_module, sampler: str | None, steps: int | None) -> dict:
        """The sampler settings to use now: the configured ones, or the method's cheapest under fast_dev_run."""
        if trainer.fast_dev_run:
            return dict(getattr(pl_module, "quick_sampling", {}))
        return {"sampler": sampler, "steps": steps}

    @staticmethod
    def count(trainer: pl.Trainer, n: int) -> int:
        return min(n, SMOKE_SAMPLES) if trainer.fast_dev_run else n

    def state_dict(self) -> dict:
        return {"val_count": self._val_count}

    def load_state_dict(self, state: dict) -> None:
        self._val_count = int(state.get("val_count", 0))
