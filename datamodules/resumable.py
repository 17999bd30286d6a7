"""A training loader whose order is a function of (seed, epoch) and which resumes mid-epoch at the next batch.

torch's shuffling DataLoader draws its permutation, and every iterator its worker seed, from the global RNG when
the iterator is made; a resumed run makes its iterator at another point of that stream, so it sees another
order and another noise stream than the run it continues. Here the permutation of epoch e comes from its own
generator seeded by (seed, e), iterators take their seeds from the loader's own generator, and the loader is
Lightning-stateful: a checkpoint records how many batches of the epoch were trained, and a resumed loader
yields the rest of that epoch first.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from difflab.errors import ConfigError


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of indices of a permutation drawn from (seed, epoch); `skip` batches are left out once (a resume).

    Under DDP each rank takes every world_size-th index of the same permutation, padded by wrapping around to a
    multiple of world_size, as torch's DistributedSampler does; so the loader shards itself and Lightning's own
    sampler injection is switched off (`Trainer(use_distributed_sampler=False)`, in every trainer config)."""

    def __init__(self, num_items: int, batch_size: int, drop_last: bool = True, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.num_items, self.batch_size, self.drop_last, self.shuffle = num_items, batch_size, drop_last, shuffle
        self.seed = int(seed)
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at every epoch start
        self.epoch = int(epoch)

    def order(self, epoch: int) -> torch.Tensor:
        """This rank's indices for the epoch."""
        if not self.shuffle:
            order = torch.arange(self.num_items)
        else:
            order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        if self.world_size > 1:
            order = order.repeat(-(-self._per_rank * self.world_size // max(self.num_items, 1)))[: self._per_rank * self.world_size]
            order = order[self.rank :: self.world_size]
        return order

    @property
    def _per_rank(self) -> int:
        return -(-self.num_items // self.world_size)

    def __len__(self) -> int:
        n = self._per_rank
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order, skip = self.order(self.epoch), self.skip
        self.skip = 0
        for b in range(skip, len(self)):
            yield order[b * self.batch_size : (b + 1) * self.batch_size].tolist()


def batches_done(datamodule) -> int:
    """Training batches consumed in the current epoch, by the trainer's count (what a resume must skip)."""
    trainer = getattr(datamodule, "trainer", None)
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed if trainer is not None else 0


def resumable_loader(datamodule, dataset, shuffle: bool, drop_last: bool, train: bool, **kwargs) -> "ResumableLoader":
    """The loader a datamodule hands Lightning; the order's seed is `datamodule.shuffle_seed`, or the run's seed
    (torch's initial seed after seed_everything); sharded by rank under DDP."""
    seed = getattr(datamodule, "shuffle_seed", None)
    seed = seed if seed is not None else torch.initial_seed() % 2**31
    trainer = getattr(datamodule, "trainer", None)
    rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    if world > 1 and trainer._accelerator_connector.use_distributed_sampler:
        raise ConfigError("difflab's data loaders shard themselves across DDP ranks (and resume mid-epoch): build the "
                          "Trainer with use_distributed_sampler=False, as every configs/trainer/*.yaml does")
    sampler = EpochBatchSampler(len(dataset), datamodule.batch_size, drop_last=drop_last, shuffle=shuffle, seed=seed,
                                rank=rank, world_size=world)
    return ResumableLoader(dataset, sampler, batches_done=(lambda: batches_done(datamodule)) if train else None, **kwargs)


class ResumableLoader(DataLoader):
    """A DataLoader over an EpochBatchSampler with Lightning's `state_dict`/`load_state_dict` interface.

    `batches_done` tells how many batches of the current epoch the training has consumed (the trainer's count:
    the sampler itself runs ahead by the batches Lightning prefetches)."""

    def __init__(self, dataset, batch_sampler: EpochBatchSampler, batches_done: Callable[[], int] | None = None, **kwargs):
        generator = torch.Generator().manual_seed(batch_sampler.seed)
        super().__init__(dataset, batch_sampler=batch_sampler, generator=generator, **kwargs)
        self._batches_done = batches_done

    def state_dict(self) -> dict:
        done = self._batches_done() if self._batches_done is not None else 0
        return {"seed": self.batch_sampler.seed, "epoch": self.batch_sampler.epoch, "batches_done": int(done)}

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.seed = int(state["seed"])
        self.batch_sampler.epoch = int(state["epoch"])
        self.batch_sampler.skip = int(state["batches_done"]) % max(len(self.batch_sampler), 1)
