"""scikit-learn's handwritten digits (8x8, shipped with the package): the offline default."""

from __future__ import annotations

import numpy as np
import torch

from datamodules.base import ArrayDataModule, one_hot
from evaluation.digits_classifier import DIGITS_MAX, load_digits_split  # one split for the data and the metric


class DigitsDataModule(ArrayDataModule):
    """8x8 grayscale digits scaled to [-1, 1]; batches are {'x': (B, 1, 8, 8)}, with labels=True also
    {'cond': (B, 10)}, the one-hot class of each digit (a class-conditional model)."""

    data_kind = "image"
    num_levels = 17  # pixel values 0..16

    def __init__(
        self,
        batch_size: int = 128,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        labels: bool = False,
    ):
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
        )
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.data_shape = (1, 8, 8)
        self.labels = bool(labels)
        self.cond_kind, self.num_classes = ("labels", 10) if self.labels else (None, None)
        self.cond_dim = self.num_classes

    def load_split(self, split: str):
        images, labels = load_digits_split(split, self.val_fraction, self.split_seed)
        if not self.labels:
            return torch.from_numpy(images)
        return {"x": torch.from_numpy(images), "cond": one_hot(torch.from_numpy(labels).long(), self.num_classes)}

    def label_accuracy(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per sample: does the project's digits classifier (the Frechet figure's) read the requested label?"""
        from evaluation.digits_classifier import load_digits_classifier, default_cache_dir

        classifier, _ = load_digits_classifier(default_cache_dir(), self.val_fraction, self.split_seed)
        with torch.no_grad():
            return classifier.eval()(x.detach().float().cpu().clamp(-1, 1).reshape(-1, 1, 8, 8)).argmax(1) == labels.cpu()

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Back to the dataset's pixel scale 0..16."""
        return ((x.clamp(-1, 1) + 1.0) / 2.0) * DIGITS_MAX

    def render(self, x: torch.Tensor, nrow: int | None = None) -> np.ndarray:
        from difflab.pictures import image_grid

        return image_grid((x.clamp(-1, 1) + 1.0) / 2.0, upscale=4, nrow=nrow)

    def make_metric(self):
        from evaluation.digits_classifier import DigitsFrechetDistance

        return DigitsFrechetDistance(val_fraction=self.val_fraction, seed=self.split_seed)
