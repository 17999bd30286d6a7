"""CelebA aligned faces, NCSN/DDPM preprocessing: center crop 140, resize to 64x64, [-1, 1], flips for training.

Splits are the official partition (list_eval_partition.txt). Images are read with PIL from the
extracted folder: torchvision's CelebA class also insists on four annotation files (attributes,
identities, boxes, landmarks) that generation never uses, so it is used only to download. With
data.labels set, the attributes are read from list_attr_celeba.txt beside the partition file, as
torchvision reads them (a count line, a line of the 40 names, then '<image> <40 values of -1/1>',
mapped to 0/1).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import numpy as np
import torch

from datamodules.base import one_hot
from datamodules.images import ImageDataModule, ImageDataset
from difflab.errors import ConfigError, DataError, MissingFileError

IMAGE_FOLDER = "img_align_celeba"
PARTITION_FILE = "list_eval_partition.txt"
PARTITIONS = {"train": 0, "val": 1, "test": 2}  # the codes in list_eval_partition.txt
HOMEPAGE = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
ATTRIBUTE_FILE = "list_attr_celeba.txt"
# The 40 binary attributes, in the order of list_attr_celeba.txt's columns
ATTRIBUTES = [
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips", "Big_Nose",
    "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses", "Goatee",
    "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard",
    "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair",
    "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
]


def check_celeba_labels(labels) -> None:
    """data.labels for CelebA: false, true (all 40 attributes) or one attribute's name; anything else in one line."""
    if isinstance(labels, bool):
        return
    if not isinstance(labels, str):
        raise ConfigError(f"data.labels={labels!r} is not valid: data.labels must be true (all {len(ATTRIBUTES)} CelebA "
                          "attributes), false, or one attribute's name (e.g. Smiling)")
    if labels not in ATTRIBUTES:
        close = difflib.get_close_matches(labels, ATTRIBUTES, n=1, cutoff=0.6) or [n for n in ATTRIBUTES if n.lower() == labels.lower()]
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"data.labels={labels!r} is not a CelebA attribute: {hint}use true (all {len(ATTRIBUTES)}), false, or one "
                          f"of the names in {ATTRIBUTE_FILE}, e.g. Smiling, Male, Young, Eyeglasses, Blond_Hair, Wearing_Hat")


def read_attributes(path: Path, names: list[str]) -> tuple[list[str], torch.Tensor]:
    """(the attribute names, 0/1 float (len(names), 40)) for the named images, from list_attr_celeba.txt."""
    if not path.is_file():
        raise MissingFileError(
            f"data.labels needs CelebA's attributes: {path} is missing. Get 'Anno/{ATTRIBUTE_FILE}' from {HOMEPAGE} "
            f"(Google Drive links) and put it beside {PARTITION_FILE}, or set data.labels=false")
    lines = path.read_text().splitlines()
    if len(lines) < 2:
        raise DataError(f"{path}: expected a count line and a line of attribute names, got {len(lines)} line(s)")
    header = lines[1].split()
    rows: dict[str, tuple[int, list[str]]] = {}
    for number, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != len(header) + 1:
            raise DataError(f"{path}, line {number}: expected '<image name>' and {len(header)} values of 1 or -1, got {line[:80]!r}")
        rows[fields[0]] = (number, fields[1:])
    missing = [name for name in names if name not in rows]
    if missing:
        raise DataError(f"{len(missing)} images of {PARTITION_FILE} have no row in {path} (first: {missing[:3]}): "
                        f"use the {ATTRIBUTE_FILE} that came with the images")
    text = np.array([rows[name][1] for name in names], dtype=str).reshape(len(names), len(header))
    bad = ~np.isin(text, ["1", "-1"])
    if bad.any():
        number = rows[names[int(np.nonzero(bad.any(axis=1))[0][0])]][0]
        raise DataError(f"{path}, line {number}: attribute values must be 1 or -1, got {lines[number - 1][:80]!r}")
    values = torch.from_numpy(text.astype(np.int8)).float()
    return header, (values + 1) / 2  # -1/1 -> 0/1, as torchvision's CelebA targets


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

    def __init__(self, files: list[Path], crop_size: int, resolution: int, flip: bool = False, cond: torch.Tensor | None = None):
        super().__init__(flip, cond)
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
    """Batches {'x': (B, 3, resolution, resolution)}; train/val/test = CelebA's official partition.

    labels: false (no cond), true ({'cond': (B, 40)}, every attribute as 0/1: multi-label, so cond_kind is
    "attributes" and samples are drawn for the validation images' attribute vectors), or one attribute's name, e.g.
    "Smiling" ({'cond': (B, 2)}, the one-hot of that attribute: cond_kind "labels", classes ["not Smiling",
    "Smiling"]). There is no label_accuracy: no attribute classifier is shipped."""

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
        labels: bool | str | None = False,
    ):
        super().__init__(root, download, batch_size, random_flip, num_workers, pin_memory, persistent_workers)
        self.inception_weights = inception_weights
        labels = False if labels is None else labels  # null in the config: what runs from before labels existed had
        check_celeba_labels(labels)
        self.labels = labels
        self.attribute = labels if isinstance(labels, str) else None  # the one attribute of a 2-class label
        if self.attribute is not None:
            self.cond_kind, self.num_classes = "labels", 2
            self.class_names = [f"not {self.attribute}", self.attribute]
            self.cond_dim = 2
        elif labels:
            self.cond_kind, self.num_classes, self.cond_dim = "attributes", None, len(ATTRIBUTES)
            self.attribute_names = list(ATTRIBUTES)
        if not 0 < crop_size <= 178:  # torchvision pads a crop larger than the image with black
            raise ConfigError(f"data.crop_size must be in (0, 178] (the aligned images are 178x218), got {crop_size}")
        self.resolution = resolution
        self.crop_size = crop_size
        self.data_shape = (3, resolution, resolution)
        # The key of cached FID statistics: they change with the crop as well as with the resolution.
        self.fid_name = f"celeba_{resolution}" if crop_size == 140 else f"celeba_crop{crop_size}_{resolution}"
        self._files: dict[str, list[Path]] = {}
        self._attributes: dict[str, torch.Tensor] = {}  # 0/1 (N, 40) per split, with labels set

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
        conds: dict[str, torch.Tensor | None] = dict.fromkeys(names)
        if self.labels is not False:
            header, values = read_attributes(folder / ATTRIBUTE_FILE, [n for split in names.values() for n in split])
            wanted = [self.attribute] if self.attribute is not None else ATTRIBUTES
            if absent := [name for name in wanted if name not in header]:
                raise DataError(f"{folder / ATTRIBUTE_FILE} has no column {absent[0]!r} (its columns: {' '.join(header[:6])} ...): "
                                f"use the {ATTRIBUTE_FILE} that came with the images")
            values = values[:, [header.index(name) for name in wanted]]
            start = 0
            for split, split_names in names.items():
                self._attributes[split] = values[start : start + len(split_names)]
                start += len(split_names)
                attrs = self._attributes[split]
                conds[split] = one_hot(attrs[:, 0].long(), 2) if self.attribute is not None else attrs
        self._splits = {
            split: FileImages(files, self.crop_size, self.resolution, flip=split == "train" and self.random_flip, cond=conds[split])
            for split, files in self._files.items()
        }

    def attribute_conditions(self, n: int, offset: int = 0) -> torch.Tensor:
        """cond for n samples of an attribute-conditional model (labels=true): the validation images' attribute
        vectors in file order, cycled, starting at `offset` (so shards of one draw continue each other)."""
        if self.cond_kind != "attributes":
            raise ValueError("attribute_conditions needs data.labels=true (all attributes)")
        self.setup()
        bank = self._attributes["val"] if len(self._attributes["val"]) else self._attributes["train"]
        return bank[(torch.arange(n) + offset) % len(bank)]

    def _fid_dataset(self, split: str) -> ImageDataset:
        """The official partition, un-flipped."""
        self.setup()
        if split not in self._files:
            raise ValueError(f"split must be one of {list(PARTITIONS)}, got {split!r}")
        return FileImages(self._files[split], self.crop_size, self.resolution)
