"""ModelCheckpoint whose last.ckpt follows every validation.

Lightning 2.6 writes last.ckpt only when a top-k checkpoint was written at the
same step; with a monitor such as the rollout score, which often does not
improve, last.ckpt would fall behind and a resume would lose the steps since
the last improvement.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint


class Checkpoint(ModelCheckpoint):
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        # Skipped when the parent already saved at this step (a new best, and last with it).
        if self.save_last and not self._should_skip_saving_checkpoint(trainer) and not self._should_save_on_train_epoch_end(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
