"""Log the datamodule's sample-quality figure (digits Frechet distance, toy sliced W1, FID) during training.

Under DDP each rank draws its own shard of `num_samples` with its own seed; the
figure is computed once over all of them: a torchmetrics-style metric (FID)
syncs its feature statistics across ranks, any other metric gets the samples
gathered to rank 0.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch

from callbacks.ema import ema_weights
from callbacks.periodic import EveryNValidations
from datamodules.base import sampling_cond


def shard_size(total: int, world_size: int, rank: int) -> int:
    """Split `total` over ranks so the shards add up to exactly `total`."""
    return total // world_size + (1 if rank < total % world_size else 0)


def gather_shards(trainer: pl.Trainer, x: torch.Tensor, total: int) -> torch.Tensor:
    """Every rank's shard on every rank, in rank order, exactly `total` rows (shards differ by at most one)."""
    if trainer.world_size == 1:
        return x
    width = math.ceil(total / trainer.world_size)
    padded = torch.zeros((width, *x.shape[1:]), dtype=x.dtype, device=trainer.strategy.root_device)
    padded[: x.shape[0]] = x.to(padded.device)
    gathered = trainer.strategy.all_gather(padded)  # (world, width, ...)
    parts = [gathered[r, : shard_size(total, trainer.world_size, r)] for r in range(trainer.world_size)]
    return torch.cat(parts).cpu()


def measure(trainer: pl.Trainer, pl_module, metric, num_samples: int, seed: int, batch_size: int, **sample_kwargs) -> dict | None:
    """Sample `num_samples` over all ranks with the EMA weights and return {metric name: value} (on every rank for
    synced metrics, on rank 0 otherwise; None on the other ranks). Labelled data: the labels cycle through every
    class, and the share of samples the data's classifier reads as their label is `label_accuracy` beside it (left
    out where the data have no classifier: CIFAR-10, CelebA). Attribute data: the validation images' vectors in turn."""
    rank, world = trainer.global_rank, trainer.world_size
    generator = torch.Generator(device=pl_module.device).manual_seed(seed + 1_000_003 * rank)
    datamodule, shard = trainer.datamodule, shard_size(num_samples, world, rank)
    # labels: every class in turn; attributes (multi-label): the validation images' attribute vectors in turn
    labels, cond = sampling_cond(datamodule, shard, sum(shard_size(num_samples, world, r) for r in range(rank)))
    if cond is not None:
        sample_kwargs = {**sample_kwargs, "cond": cond.to(pl_module.device)}
    with ema_weights(trainer, pl_module):
        x = pl_module.sample_many(shard, batch_size, generator, **sample_kwargs)
    extra = {}
    if labels is not None and hasattr(datamodule, "label_accuracy"):
        hits = gather_shards(trainer, datamodule.label_accuracy(x, labels).float(), num_samples)
        extra = {"label_accuracy": float(hits.mean())}
    if hasattr(metric, "update"):
        metric.update(x)
        return {metric.name: metric.compute(), **extra}
    x = gather_shards(trainer, x, num_samples)
    return {metric.name: metric(x), **extra} if trainer.is_global_zero else None


class QualityMetric(EveryNValidations):
    """Every `every_n_val` validations: `quality/<metric>` from `num_samples` EMA samples (total over ranks)."""

    def __init__(self, num_samples: int = 512, every_n_val: int = 1, sampler: str | None = None, steps: int | None = None,
                 seed: int = 1, batch_size: int = 1000):
        super().__init__(every_n_val)
        self.num_samples = num_samples
        self.sampler = sampler
        self.steps = steps
        self.seed = seed
        self.batch_size = batch_size
        self.metric = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Built at start so a missing resource (Inception weights) fails before any training time is spent.
        if stage == "fit" and self.metric is None and getattr(trainer.datamodule, "cond_kind", None) != "observations":
            self.metric = trainer.datamodule.make_metric()
            if hasattr(self.metric, "to"):
                self.metric.to(pl_module.device)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.metric is None or not self.due(trainer):
            return
        # Under fast_dev_run too few samples for a meaningful figure (FID needs 2+): the pipeline is what is checked.
        num_samples = max(self.count(trainer, self.num_samples), 2)
        sampling = self.sampling(trainer, pl_module, self.sampler, self.steps)
        values = measure(trainer, pl_module, self.metric, num_samples, self.seed, self.batch_size, **sampling)
        if trainer.is_global_zero and values is not None:
            name = self.metric.name
            nfe = pl_module.nfe(sampling.get("sampler"), sampling.get("steps"))  # None: an adaptive solver's
            logged = {f"quality/{k}": v for k, v in values.items()} | ({f"quality/{name}_nfe": nfe} if nfe is not None else {})
            if not hasattr(self.metric, "update"):
                # cheap for digits/toys; FID's floor needs 10k held-out images through Inception: see evaluate.py
                logged[f"quality/{name}_floor"] = self.metric.floor(num_samples)
            for logger in trainer.loggers:
                logger.log_metrics(logged, step=trainer.global_step)
