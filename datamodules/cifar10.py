"""CIFAR-10: 32x32 RGB in [-1, 1], random horizontal flips for training (DDPM/NCSN++).

The python-pickle batches are read here rather than through torchvision.datasets.CIFAR10:
that class md5-checks all seven files (~170 MB) on every construction, even with
download=False, and reports a missing or mismatching file as a bare RuntimeError
(so no test copy can pass it either). torchvision is used only to download.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from datamodules.base import one_hot
from datamodules.images import ImageDataModule, ImageDataset
from difflab.errors import ConfigError, DataError, MissingFileError

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
# The classes 0..9 in order (batches.meta's label_names)
CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def missing_cifar10_error(root: Path, missing: list[str], cause: str = "") -> MissingFileError:
    return MissingFileError(
        f"CIFAR-10 not found: expected the python batches {TRAIN_FILES + TEST_FILES} in {root / FOLDER} "
        f"(missing: {missing}). {cause}Either run with data.download=true (needs internet), or download {URL} "
        f"and extract it into {root} (it unpacks to {FOLDER}/), or set data.root to the folder that contains {FOLDER}/."
    )


def read_cifar10_batches(folder: Path, names: list[str], with_labels: bool = False):
    """The images of the named batch files, uint8 (N, 3, 32, 32); with_labels: also their classes, int64 (N,) in
    0..9 (each batch's 'labels', what torchvision's CIFAR10 gives as targets)."""
    arrays, labels = [], []
    for name in names:
        path = folder / name
        try:
            with open(path, "rb") as f:
                # The batches are Python 2 pickles: latin1 turns their str into what numpy expects.
                entry = pickle.load(f, encoding="latin1")
        except (pickle.UnpicklingError, EOFError, ValueError) as err:
            raise DataError(f"{path} is not a readable CIFAR-10 python batch ({err}); delete it and download {URL} again") from None
        if not isinstance(entry, dict):
            raise DataError(f"{path}: expected a pickled dict with 'data', got {type(entry).__name__}")
        entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
        data = np.asarray(entry.get("data"))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"{path}: expected 'data' as uint8 (N, 3072), got {data.dtype} {data.shape}; is this another data set?")
        arrays.append(data)
        if with_labels:
            targets = np.asarray(entry.get("labels", []))
            if targets.shape != (len(data),) or not np.issubdtype(targets.dtype, np.integer) or (
                    len(targets) and (targets.min() < 0 or targets.max() >= len(CLASS_NAMES))):
                raise DataError(f"{path}: expected 'labels' as {len(data)} classes in 0..{len(CLASS_NAMES) - 1} (one per image), "
                                f"got {targets.dtype} {targets.shape}; delete it and download {URL} again")
            labels.append(targets.astype(np.int64))
    # Each row is three 32x32 planes (R, G, B), each row-major.
    images = torch.from_numpy(np.concatenate(arrays).reshape(-1, 3, 32, 32))
    return (images, torch.from_numpy(np.concatenate(labels))) if with_labels else images


class ArrayImages(ImageDataset):
    """Images held in memory as uint8 (N, C, H, W); `indices` picks a split without copying."""

    def __init__(self, images: torch.Tensor, indices: list[int] | None = None, flip: bool = False,
                 cond: torch.Tensor | None = None):
        super().__init__(flip, cond)  # cond: one row per item of this split (not per image of `images`)
        self.images = images
        self.indices = list(range(len(images))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> torch.Tensor:
        return self.images[self.indices[index]]


class CIFAR10DataModule(ImageDataModule):
    """Batches {'x': (B, 3, 32, 32)}, with labels=True also {'cond': (B, 10)}, the one-hot class of each image
    (a class-conditional model); val_size images of the 50,000 training images (fixed by split_seed)
    are held out for validation, test is the official 10,000-image test batch.

    There is no label_accuracy: the classifier it would need is not shipped (nor downloadable offline), so a
    labelled run reports FID alone."""

    class_names = CLASS_NAMES

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
        inception_weights: str | None = None,
        labels: bool | None = False,
    ):
        super().__init__(root, download, batch_size, random_flip, num_workers, pin_memory, persistent_workers)
        labels = False if labels is None else labels  # null in the config: what runs from before labels existed had
        if not isinstance(labels, bool):
            raise ConfigError(f"data.labels={labels!r} is not valid: data.labels must be true or false for CIFAR-10")
        self.inception_weights = inception_weights
        self.labels = labels
        self.cond_kind, self.num_classes = ("labels", len(CLASS_NAMES)) if labels else (None, None)
        self.cond_dim = self.num_classes
        self.val_size = val_size
        self.split_seed = split_seed
        self.data_shape = (3, 32, 32)
        self.fid_name = "cifar10_32"
        self._official: dict[str, torch.Tensor] = {}

    def _missing(self) -> list[str]:
        return [name for name in TRAIN_FILES + TEST_FILES if not (self.root / FOLDER / name).is_file()]

    def prepare_data(self) -> None:
        """Downloads (data.download=true) only when files are missing; the Trainer runs this on one process."""
        if not self.download or not self._missing():
            return
        from torchvision.datasets import CIFAR10

        try:
            CIFAR10(str(self.root), train=True, download=True)
        except Exception as err:  # offline: URLError/OSError; a bad archive: RuntimeError
            cause = f"The download failed ({type(err).__name__}: {err}). "
            raise missing_cifar10_error(self.root, self._missing(), cause) from None

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        self.prepare_data()
        if missing := self._missing():
            raise missing_cifar10_error(self.root, missing)
        folder = self.root / FOLDER
        if self.labels:
            (train, train_labels), (test, test_labels) = (read_cifar10_batches(folder, names, with_labels=True)
                                                          for names in (TRAIN_FILES, TEST_FILES))
        else:
            train, test = read_cifar10_batches(folder, TRAIN_FILES), read_cifar10_batches(folder, TEST_FILES)
            train_labels = test_labels = None
        self._official = {"train": train, "test": test}
        if not 0 <= self.val_size < len(train):
            raise ConfigError(f"data.val_size must be in [0, {len(train)}), got {self.val_size}")
        order = np.random.default_rng(self.split_seed).permutation(len(train))
        val_idx, train_idx = sorted(order[: self.val_size].tolist()), sorted(order[self.val_size :].tolist())

        def cond(targets: torch.Tensor | None, indices: list[int] | None = None) -> torch.Tensor | None:
            if targets is None:
                return None
            return one_hot(targets if indices is None else targets[indices], self.num_classes)

        self._splits = {
            "train": ArrayImages(train, train_idx, flip=self.random_flip, cond=cond(train_labels, train_idx)),
            "val": ArrayImages(train, val_idx, cond=cond(train_labels, val_idx)),
            "test": ArrayImages(test, cond=cond(test_labels)),
        }

    def _fid_dataset(self, split: str) -> ImageDataset:
        """'train': all 50,000 training images, the reference of the papers' FIDs (and independent of
        val_size, so statistics cached under fid_name stay valid). 'val'/'test': the 10,000 test images,
        the held-out set: the carved val split lies inside the reference, so it cannot measure a floor."""
        self.setup()
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        return ArrayImages(self._official["train" if split == "train" else "test"])
