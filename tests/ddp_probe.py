"""Run by tests/test_ddp.py as `python tests/ddp_probe.py OUT_DIR [CKPT]`: a 2-process CPU DDP (gloo) run
that writes what each rank saw to OUT_DIR/rank{r}.pt, so the test can compare ranks."""

import sys
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torchmetrics import Metric  # noqa: E402

from callbacks.ema import EMA  # noqa: E402
from callbacks.quality import measure  # noqa: E402
from callbacks.sample_logger import SampleLogger  # noqa: E402
from datamodules.toy2d import Toy2DDataModule  # noqa: E402
from lightning_modules.ddpm import DDPM  # noqa: E402
from lightning_modules.nets import MLP  # noqa: E402

NUM_SAMPLES = 11  # odd on purpose: shards of 6 and 5


class Rows(Metric):
    """A synced metric (like FID): each rank adds its rows; compute() sees every rank's."""

    name = "rows"

    def __init__(self):
        super().__init__()
        self.add_state("rows", default=[], dist_reduce_fx="cat")

    def update(self, x):
        self.rows.append(x)

    def compute(self):
        rows = self.rows if isinstance(self.rows, torch.Tensor) else torch.cat(self.rows)
        return rows.clone()


class Gathered:
    """A plain metric (like the digits Frechet distance): called once, on rank 0, with every sample."""

    name = "rows"

    def __call__(self, x):
        return x.clone()


class Probe(pl.Callback):
    def __init__(self, out: Path):
        self.out = out
        self.batches = []
        self.record = {}

    def on_train_start(self, trainer, pl_module):
        ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMA))
        self.record["start_step"] = trainer.global_step
        self.record["start_params"] = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        self.record["start_ema"] = torch.cat([p.detach().flatten() for p in ema._average_model.module.parameters()])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch["x"].clone())

    def on_train_epoch_end(self, trainer, pl_module):
        pass

    def on_fit_end(self, trainer, pl_module):
        # the EMA weights (the EMA callback copies them into the module at its own on_fit_end)
        ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMA))
        rank = trainer.global_rank
        self.record.update(
            rank=rank,
            world_size=trainer.world_size,
            step=trainer.global_step,
            params_after_fit=torch.cat([p.detach().flatten() for p in ema._average_model.module.parameters()]),
            lr=trainer.optimizers[0].param_groups[0]["lr"],
            batches=torch.stack(self.batches),
            synced=measure(trainer, pl_module, Rows(), NUM_SAMPLES, seed=3, batch_size=4, steps=3)["rows"],
            gathered=(measure(trainer, pl_module, Gathered(), NUM_SAMPLES, seed=3, batch_size=4, steps=3) or {}).get("rows"),
        )
        torch.save(self.record, self.out / f"rank{rank}.pt")


def main(out: Path, ckpt: str | None):
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0)
    data = Toy2DDataModule("moons", num_train=512, num_val=64, batch_size=16)
    model = DDPM(MLP((2,), hidden=32, depth=2, emb_dim=16), partial(torch.optim.Adam, lr=1e-3), data_shape=(2,), num_timesteps=50, sampling={"steps": 3})
    model.run_config = {"note": "ddp probe"}
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=8 if ckpt is None else 10, default_root_dir=out,
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        val_check_interval=4, check_val_every_n_epoch=None, limit_val_batches=1, use_distributed_sampler=False,
        callbacks=[
            EMA(decay=0.9),
            Probe(out),
            SampleLogger(num_samples=8, steps=3),
            pl.callbacks.ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, every_n_train_steps=4, save_top_k=-1),
        ],
    )
    trainer.fit(model, datamodule=data, ckpt_path=ckpt)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
