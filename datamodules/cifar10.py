"""CIFAR-10 through torchvision: 32x32 RGB in [-1, 1], random horizontal flips for training (DDPM/NCSN++)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

CIFAR10_FILES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch", "batches.meta"]


class _AsDict(Dataset):
    """torchvision's (image, label) pairs as the project's batch dict."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index):
        image, _ = self.base[index]
        return {"x": image}


def missing_cifar10_error(root: Path) -> FileNotFoundError:
    folder = root / "cifar-10-batches-py"
    return FileNotFoundError(
        f"CIFAR-10 not found: expected the python-pickle batches {CIFAR10_FILES} in {folder}. "
        "Either run with data.download=true (needs internet), or download "
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it into "
        f"{root} (it unpacks to cifar-10-batches-py/), or point data.root at the folder that contains cifar-10-batches-py/."
    )


class CIFAR10DataModule(pl.LightningDataModule):
    data_kind = "image"

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        batch_size: int = 128,
        val_size: int = 5000,
        split_seed: int = 0,
        random_flip: bool = True,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
    ):
        super().__init__()
        self.root = Path(root)
        self.download = download
        self.batch_size = batch_size
        self.val_size = val_size
        self.split_seed = split_seed
        self.random_flip = random_flip
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.data_shape = (3, 32, 32)
        self.cond_dim = None
        self._train = self._val = self._test = None

    def _transform(self, train: bool):
        from torchvision import transforms as T

        ops = [T.RandomHorizontalFlip()] if (train and self.random_flip) else []
        return T.Compose(ops + [T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])

    def _dataset(self, train: bool, transform):
        from torchvision.datasets import CIFAR10

        folder = self.root / "cifar-10-batches-py"
        if not self.download and not all((folder / f).exists() for f in CIFAR10_FILES):
            raise missing_cifar10_error(self.root)
        try:
            return CIFAR10(str(self.root), train=train, transform=transform, download=self.download)
        except RuntimeError as err:  # torchvision's integrity check failed or the download did
            raise missing_cifar10_error(self.root) from err

    def prepare_data(self) -> None:
        if self.download:
            self._dataset(True, None)
            self._dataset(False, None)

    def setup(self, stage: str | None = None) -> None:
        if self._train is not None:
            return
        train_full = self._dataset(True, self._transform(train=True))
        plain_full = self._dataset(True, self._transform(train=False))
        if not 0 <= self.val_size < len(train_full):
            raise ValueError(f"data.val_size must be in [0, {len(train_full)}), got {self.val_size}")
        order = np.random.default_rng(self.split_seed).permutation(len(train_full))
        val_idx, train_idx = order[: self.val_size].tolist(), order[self.val_size :].tolist()
        self._train = _AsDict(Subset(train_full, train_idx))
        self._val = _AsDict(Subset(plain_full, val_idx))
        self._test = _AsDict(self._dataset(False, self._transform(train=False)))

    def _loader(self, dataset, shuffle: bool, drop_last: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self._train, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self._val, shuffle=False, drop_last=False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self._test, shuffle=False, drop_last=False)

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Back to [0, 1] pixels."""
        return (x.clamp(-1, 1) + 1.0) / 2.0

    def render(self, x: torch.Tensor) -> np.ndarray:
        from callbacks.visualize import image_grid

        return image_grid(self.unnormalize(x))

    def make_metric(self):
        # FID against CIFAR-10 needs Inception weights: see the evaluation issue (callbacks=fid).
        return None
