"""CelebA aligned faces, NCSN/DDPM preprocessing: center crop 140, resize to 64x64, [-1, 1], flips for training.

Splits are the official partition (list_eval_partition.txt). Images are read with PIL from the
extracted folder: torchvision's CelebA class also insists on four annotation files (attributes,
identities, boxes, landmarks) that generation never uses, so it is used only to download.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from datamodules.images import ImageDataModule, ImageDataset
from difflab.errors import ConfigError, DataError, MissingFileError

IMAGE_FOLDER = "img_align_celeba"
PARTITION_FILE = "list_eval_partition.txt"
PARTITIONS = {"train": 0, "val": 1, "test": 2}  # the codes in list_eval_partition.txt
HOMEPAGE = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"


def find_celeba(root: Path) -> Path | None:
    """The folder holding img_align_celeba/ and list_eval_partition.txt: root/celeba/ (torchvision's layout) or root."""
    for folder in (root / "celeba", root):
        if (folder / IMAGE_FOLDER).is_dir() and (folder / PARTITION_FILE).is_file():
            return folder
    return None


def missing_celeba_error(root: Path, cause: str = "") -> MissingFileError:
    candidates = [root / "celeba" / IMAGE_FOLDER, root / "celeba" / PARTITION_FILE, root / IMAGE_FOLDER, root / PARTITION_FILE]
    found = [str(path) for path in candidates if path.exists()] or "neither"
    return MissingFileError(
        f"CelebA not found: expected {IMAGE_FOLDER}/ (the 202,599 aligned 178x218 JPEGs) and {PARTITION_FILE} "
        f"together in {root / 'celeba'} (or directly in {root}); found: {found}. {cause}"
        f"Get 'Align&Cropped Images' (img_align_celeba.zip) and 'Eval/{PARTITION_FILE}' from {HOMEPAGE} "
        f"(Google Drive links), unzip the images into {root / 'celeba'} and put the partition file beside them, "
        "or set data.root to the folder that holds them. data.download=true tries torchvision's Google Drive "
        "download (needs internet and `pip install gdown`; Drive often refuses it with a quota error)."
    )


def read_partition(path: Path) -> dict[str, list[str]]:
    """Image names per split from lines '<image name> <0|1|2>'."""
    names: dict[str, list[str]] = {split: [] for split in PARTITIONS}
    split_of = {str(code): split for split, code in PARTITIONS.items()}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in split_of:
            raise DataError(f"{path}, line {number}: expected '<image name> <0|1|2>', got {line!r}")
        names[split_of[fields[1]]].append(fields[0])
    return names


def center_crop_resize(image, crop_size: int, resolution: int) -> torch.Tensor:
    """PIL image -> uint8 (3, resolution, resolution): the central crop_size square, resized with antialiasing."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    square = TF.center_crop(image.convert("RGB"), [crop_size, crop_size])
    square = TF.resize(square, [resolution, resolution], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.pil_to_tensor(square)


class FileImages(ImageDataset):
    """Image files decoded on access (202,599 faces do not fit in memory as 178x218)."""

    def __init__(self, files: list[Path], crop_size: int, resolution: int, flip: bool = False):
        super().__init__(flip)
        self.files = files
        self.crop_size = crop_size
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.files[index]) as image:
            return center_crop_resize(image, self.crop_size, self.resolution)


class CelebADataModule(ImageDataModule):
    """Batches {'x': (B, 3, resolution, resolution)}; train/val/test = CelebA's official partition."""

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        batch_size: int = 128,
        resolution: int = 64,
        crop_size: int = 140,
        random_flip: bool = True,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        inception_weights: str | None = None,
    ):
        super().__init__(root, download, batch_size, random_flip, num_workers, pin_memory, persistent_workers)
        self.inception_weights = inception_weights
        if not 0 < crop_size <= 178:  # torchvision pads a crop larger than the image with black
            raise ConfigError(f"data.crop_size must be in (0, 178] (the aligned images are 178x218), got {crop_size}")
        self.resolution = resolution
        self.crop_size = crop_size
        self.data_shape = (3, resolution, resolution)
        # The key of cached FID statistics: they change with the crop as well as with the resolution.
        self.fid_name = f"celeba_{resolution}" if crop_size == 140 else f"celeba_crop{crop_size}_{resolution}"
        self._files: dict[str, list[Path]] = {}

    def prepare_data(self) -> None:
        """Downloads (data.download=true) only when no extracted copy exists; the Trainer runs this on one process."""
        if not self.download or find_celeba(self.root):
            return
        from torchvision.datasets import CelebA

        try:
            CelebA(str(self.root), split="all", target_type=[], download=True)  # into root/celeba/
        except Exception as err:  # no gdown, offline, Drive quota: RuntimeError/OSError/...
            raise missing_celeba_error(self.root, f"The download failed ({type(err).__name__}: {err}). ") from None

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        self.prepare_data()
        folder = find_celeba(self.root)
        if folder is None:
            raise missing_celeba_error(self.root)
        names = read_partition(folder / PARTITION_FILE)
        images = folder / IMAGE_FOLDER
        present = set(os.listdir(images))
        missing = [name for split in names.values() for name in split if name not in present]
        if missing:
            raise MissingFileError(
                f"{len(missing)} of the images listed in {folder / PARTITION_FILE} are missing from {images} "
                f"(first: {missing[:3]}). Extract img_align_celeba.zip completely; if the images sit one folder "
                f"deeper ({IMAGE_FOLDER}/{IMAGE_FOLDER}/, as in the Kaggle archive), move them up."
            )
        self._files = {split: [images / name for name in split_names] for split, split_names in names.items()}
        self._splits = {
            split: FileImages(files, self.crop_size, self.resolution, flip=split == "train" and self.random_flip)
            for split, files in self._files.items()
        }

    def _fid_dataset(self, split: str) -> ImageDataset:
        """The official partition, un-flipped."""
        self.setup()
        if split not in self._files:
            raise ValueError(f"split must be one of {list(PARTITIONS)}, got {split!r}")
        return FileImages(self._files[split], self.crop_size, self.resolution)
