"""ModelCheckpoint whose last.ckpt follows every validation, and whose best checkpoint waits for its score.

Lightning 2.6 writes last.ckpt only when a top-k checkpoint was written at the
same step; with a monitor such as the rollout score, which often does not
improve, last.ckpt would fall behind and a resume would lose the steps since
the last improvement.

A monitored score that is measured only at some validations (rollouts with
`callbacks.rollout.every_n_val=4`) is missing at the others; Lightning would stop
the run there. Here those validations write last.ckpt only, and a monitor that
never appears in a whole run is reported at its end.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn


class Checkpoint(ModelCheckpoint):
    _monitor_seen = False

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        # Skipped when the parent already saved at this step (a new best, and last with it).
        if self.save_last and not self._should_skip_saving_checkpoint(trainer) and not self._should_save_on_train_epoch_end(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict) -> None:
        if self.monitor is not None and self.monitor not in monitor_candidates:
            return  # not measured at this validation
        self._monitor_seen = True
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None and self.save_top_k != 0 and not self._monitor_seen and not trainer.sanity_checking:
            rank_zero_warn(
                f"callbacks.model_checkpoint.monitor={self.monitor!r} was never logged in this run, so no best checkpoint "
                f"was written (last.ckpt was). Logged: {sorted(trainer.callback_metrics)}"
            )
