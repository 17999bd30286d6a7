"""A datamodule over in-memory tensors, yielding dict batches {'x': ..., optionally 'cond': ...}."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.resumable import resumable_loader
from difflab.errors import ConfigError, DataError


def check_finite(name: str, array, where: str = "") -> None:
    """Refuse data with NaN or inf, naming the key and the first bad row: it would train a NaN model and the
    error would surface much later, blaming the learning rate."""
    values = torch.as_tensor(array) if not isinstance(array, torch.Tensor) else array
    if not values.is_floating_point():
        return
    bad_rows = (~torch.isfinite(values.reshape(len(values), -1))).any(dim=1).nonzero()
    if len(bad_rows):
        row = int(bad_rows[0])
        shown = np.array2string(values[row].reshape(-1)[:8].cpu().numpy(), precision=4, separator=", ")
        raise DataError(f"{where}{name} has non-finite values in {len(bad_rows)} of {len(values)} rows (first: row {row} = "
                        f"{shown}{' ...' if values[row].numel() > 8 else ''}): repair or drop those rows; nothing was trained")


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class labels as the float condition vector every net reads (the null condition is learned beside it)."""
    labels = torch.as_tensor(labels).long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConfigError(f"labels must be in 0..{num_classes - 1}, got {labels.min().item()}..{labels.max().item()}")
    return torch.nn.functional.one_hot(labels, num_classes).float()


def balanced_labels(n: int, num_classes: int, offset: int = 0) -> torch.Tensor:
    """n labels cycling through every class (a uniform draw without its sampling noise); offset continues a cycle."""
    return (torch.arange(n) + offset) % num_classes


def sampling_cond(datamodule, n: int, offset: int = 0) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(labels, cond) for drawing n samples of the data's kind of condition, on the CPU. "labels": every class in turn
    (balanced_labels) and their one-hot; "attributes" (multi-label, e.g. CelebA's 40): no labels, and the
    datamodule's attribute_conditions(n, offset), attribute vectors of real validation images; otherwise (None, None).
    offset continues the cycle (a rank's shard after the ones before it)."""
    kind = getattr(datamodule, "cond_kind", None)
    if kind == "labels":
        labels = balanced_labels(n, datamodule.num_classes, offset)
        return labels, one_hot(labels, datamodule.num_classes)
    if kind == "attributes":
        return None, datamodule.attribute_conditions(n, offset).float()
    return None, None


def label_scores(datamodule, x: torch.Tensor, labels: torch.Tensor) -> dict:
    """label_accuracy (the share of samples the data's classifier reads as their requested label) and the same per
    class, for metrics.json; empty where the data have no classifier."""
    if not hasattr(datamodule, "label_accuracy"):
        return {}
    hits = datamodule.label_accuracy(x, labels).float()
    return {"label_accuracy": float(hits.mean()),
            "per_class_accuracy": [round(float(hits[labels == c].mean()), 4) for c in range(datamodule.num_classes)]}


def collate_dict(batch):
    """TensorDictDataset already returns whole batches: pass them through."""
    return batch


class TensorDictDataset(Dataset):
    """Indexes every tensor of a dict at once; __getitems__ makes a batch one gather instead of B calls."""

    def __init__(self, **tensors: torch.Tensor):
        lengths = {len(v) for v in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"all tensors need the same length, got {lengths}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index):
        return {k: v[index] for k, v in self.tensors.items()}

    def __getitems__(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {k: v[idx] for k, v in self.tensors.items()}


class ArrayDataModule(pl.LightningDataModule):
    """Subclasses set data_shape, cond_dim, data_kind and implement load_split(split) -> Tensor or dict."""

    data_kind = "image"  # 'image' | 'points' | 'trajectory': how samples are rendered
    num_levels: int | None = None  # discrete intensity levels (dequantisation for bits/dim); None: continuous data

    # What a batch's cond is: None (unconditional), "labels" (one-hot class labels, num_classes of them),
    # "attributes" (a 0/1 vector of cond_dim attributes that may hold together, e.g. CelebA's; samples are drawn for
    # real validation images' vectors, see sampling_cond) or "observations" (a policy's history): callbacks and the
    # final evaluation decide what to draw from it.
    cond_kind: str | None = None
    num_classes: int | None = None

    def __init__(self, batch_size: int = 128, num_workers: int = 0, pin_memory: bool = False, persistent_workers: bool = False,
                 shuffle_seed: int | None = None):
        super().__init__()
        # null: the run's seed (torch's initial seed after seed_everything); resumes restore it from the checkpoint
        self.shuffle_seed = shuffle_seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.data_shape: tuple[int, ...] = ()
        self.cond_dim: int | None = None
        self._splits: dict[str, TensorDictDataset] = {}

    def load_split(self, split: str):
        raise NotImplementedError

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def render(self, x: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def make_metric(self):
        return None

    def setup(self, stage: str | None = None) -> None:
        for split in ("train", "val"):
            if split not in self._splits:
                data = self.load_split(split)
                if isinstance(data, Dataset):  # a subclass's own indexing (e.g. camera frames gathered per batch)
                    self._splits[split] = data
                    continue
                data = data if isinstance(data, dict) else {"x": data}
                for key, value in data.items():
                    check_finite(f"'{key}'", value, f"{type(self).__name__}, {split} split: ")
                self._splits[split] = TensorDictDataset(**data)

    def dataset(self, split: str) -> TensorDictDataset:
        self.setup()
        return self._splits[split]

    def _loader(self, split: str, shuffle: bool, drop_last: bool) -> DataLoader:
        return resumable_loader(self, self.dataset(split), shuffle, drop_last, train=split == "train", num_workers=self.num_workers,
                                pin_memory=self.pin_memory, persistent_workers=self.persistent_workers, collate_fn=collate_dict)

    def train_dataloader(self) -> DataLoader:
        if len(self.dataset("train")) < self.batch_size:
            raise ConfigError(
                f"data.batch_size={self.batch_size} is larger than the training set ({len(self.dataset('train'))}); lower it"
            )
        return self._loader("train", shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False, drop_last=False)
