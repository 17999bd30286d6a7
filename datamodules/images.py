"""What the image datamodules (CIFAR-10, CelebA) share: uint8 -> [-1, 1], training flips, loaders, pictures."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from datamodules.resumable import resumable_loader
from difflab.errors import ConfigError


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels 0..255 -> float in [-1, 1] (the DDPM scaling)."""
    return images.float() / 127.5 - 1.0


class ImageDataset(Dataset):
    """Items {'x': float (C, H, W) in [-1, 1]}, with `cond` also {'cond': cond[i]} (a float vector per item: one-hot
    labels or 0/1 attributes, unchanged by a flip); subclasses implement load(i) -> uint8 (C, H, W).

    With flip=True each draw is mirrored left-right with p=0.5 (DDPM, NCSN++: the only augmentation).
    The coin comes from torch's global RNG, which the DataLoader seeds per worker and Lightning's
    seed_everything seeds in the main process, so runs are reproducible.
    """

    def __init__(self, flip: bool, cond: torch.Tensor | None = None):
        self.flip = flip
        self.cond = cond

    def load(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = self.load(index)
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        if self.cond is None:
            return {"x": to_model_range(image)}
        return {"x": to_model_range(image), "cond": self.cond[index]}


class ImageDataModule(pl.LightningDataModule):
    """Loaders, rendering and FID hooks over splits that subclasses build in setup().

    Subclasses set data_shape and fid_name, fill self._splits = {'train', 'val', 'test': ImageDataset}
    in setup(), and implement _fid_dataset(split) -> an un-flipped ImageDataset.
    """

    data_kind = "image"
    num_levels = 256  # 8-bit pixels
    # What a batch's cond is (see datamodules/base.py): None, "labels" (one-hot, num_classes of them) or, for
    # multi-label data, "attributes" (a 0/1 vector of cond_dim attributes; drawn from the validation set's vectors).
    cond_kind: str | None = None
    num_classes: int | None = None

    def __init__(
        self,
        root: str | Path,
        download: bool,
        batch_size: int,
        random_flip: bool,
        num_workers: int,
        pin_memory: bool,
        persistent_workers: bool,
    ):
        super().__init__()
        self.root = Path(root).expanduser()
        self.download = download
        self.batch_size = batch_size
        self.random_flip = random_flip
        self.num_workers = num_workers
        # Pinning without a GPU only costs a copy (and torch warns about it).
        self.pin_memory = pin_memory and torch.cuda.is_available()
        # DataLoader refuses persistent_workers without workers; the config default must still work with 0.
        self.persistent_workers = persistent_workers and num_workers > 0
        self.cond_dim = None
        self.data_shape: tuple[int, int, int] = (3, 0, 0)
        self.fid_name = ""
        self._splits: dict[str, ImageDataset] = {}

    def _fid_dataset(self, split: str) -> ImageDataset:
        raise NotImplementedError

    def dataset(self, split: str) -> ImageDataset:
        """The 'train' (flipped when random_flip), 'val' or 'test' dataset."""
        self.setup()
        if split not in self._splits:
            raise ValueError(f"split must be one of {sorted(self._splits)}, got {split!r}")
        return self._splits[split]

    def _loader(self, dataset: Dataset, shuffle: bool = False, drop_last: bool = False, persistent: bool = True,
                train: bool = False) -> DataLoader:
        # The order resumes exactly (seeded per epoch, Lightning-stateful); the flips come from the worker RNGs,
        # which restart on resume.
        return resumable_loader(self, dataset, shuffle, drop_last, train, num_workers=self.num_workers, pin_memory=self.pin_memory,
                                persistent_workers=self.persistent_workers and persistent)

    def train_dataloader(self) -> DataLoader:
        train = self.dataset("train")
        if len(train) < self.batch_size:  # drop_last would silently give an empty epoch
            raise ConfigError(f"data.batch_size={self.batch_size} is larger than the training set ({len(train)}); lower it")
        return self._loader(train, shuffle=True, drop_last=True, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"))

    def real_images_for_fid(self, split: str = "train", max_images: int | None = None) -> DataLoader:
        """Un-flipped real images as batches {'x': [-1, 1]}, for FID statistics.

        max_images takes a fixed random subset (seed 0, in file order), so a capped
        reference is the same on every run and spread over the whole split.
        """
        dataset = self._fid_dataset(split)
        if max_images is not None and max_images < len(dataset):
            chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:max_images]
            dataset = Subset(dataset, chosen.sort().values.tolist())
        return self._loader(dataset, persistent=False)

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Back to [0, 1] pixels."""
        return (x.clamp(-1, 1) + 1.0) / 2.0

    def render(self, x: torch.Tensor, nrow: int | None = None) -> np.ndarray:
        """A grid of nrow images per row (None: square)."""
        from difflab.pictures import image_grid

        return image_grid(self.unnormalize(x), nrow=nrow)

    def make_metric(self):
        """FID against the training images; real statistics cached per dataset and resolution (fid_name)."""
        from evaluation.fid import InceptionFID

        self.setup("fit")
        return InceptionFID(self, inception_weights=getattr(self, "inception_weights", None))
