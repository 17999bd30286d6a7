"""callbacks.checkpoint.Checkpoint: last.ckpt at every validation; a monitored score that is logged only at some
validations (rollouts every n-th) picks the best among those instead of stopping the run."""

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from callbacks.checkpoint import Checkpoint


class Scored(pl.LightningModule):
    """Logs `score` only at every other validation; the score peaks at the second time it is logged."""

    def __init__(self, log_score: bool = True):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.log_score, self.vals = log_score, 0

    def training_step(self, batch, batch_idx):
        return (self.w - batch[0].mean()) ** 2

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", (self.w - batch[0].mean()) ** 2)

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking:
            return
        self.vals += 1
        if self.log_score and self.vals % 2 == 0:
            self.log("score", [0.0, 0.3, 0.9, 0.5][self.vals // 2])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp_path, module):
    data = DataLoader(TensorDataset(torch.randn(8, 1)), batch_size=2)
    ckpt = Checkpoint(dirpath=tmp_path, filename="best_step{step}", monitor="score", mode="max", save_top_k=1, save_last=True,
                      auto_insert_metric_name=False, enable_version_counter=False)
    trainer = pl.Trainer(max_steps=24, val_check_interval=4, callbacks=[ckpt], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu")
    trainer.fit(module, data, data)
    return ckpt


def test_a_score_logged_at_some_validations_picks_the_best_of_those(tmp_path):
    ckpt = fit(tmp_path, Scored())  # validations at steps 4..24; score at 8 (0.3), 16 (0.9), 24 (0.5)
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["best_step16.ckpt", "last.ckpt"]
    assert ckpt.best_model_score.item() == pytest.approx(0.9)
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 24


def test_a_monitor_never_logged_warns_at_the_end_and_keeps_last(tmp_path):
    with pytest.warns(UserWarning, match="'score' was never logged"):
        fit(tmp_path, Scored(log_score=False))
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["last.ckpt"]
