"""scikit-learn's handwritten digits (8x8, shipped with the package): the offline default."""

from __future__ import annotations

import numpy as np
import torch

from datamodules.base import ArrayDataModule
from evaluation.digits_classifier import DIGITS_MAX, load_digits_split  # one split for the data and the metric


class DigitsDataModule(ArrayDataModule):
    """8x8 grayscale digits scaled to [-1, 1]; batches are {'x': (B, 1, 8, 8)}."""

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
        self.cond_dim = None

    def load_split(self, split: str) -> torch.Tensor:
        images, _ = load_digits_split(split, self.val_fraction, self.split_seed)
        return torch.from_numpy(images)

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Back to the dataset's pixel scale 0..16."""
        return ((x.clamp(-1, 1) + 1.0) / 2.0) * DIGITS_MAX

    def render(self, x: torch.Tensor) -> np.ndarray:
        from difflab.pictures import image_grid

        return image_grid((x.clamp(-1, 1) + 1.0) / 2.0, upscale=4)

    def make_metric(self):
        from evaluation.digits_classifier import DigitsFrechetDistance

        return DigitsFrechetDistance(val_fraction=self.val_fraction, seed=self.split_seed)
