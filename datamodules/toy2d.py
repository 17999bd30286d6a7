"""2-D toy distributions with known ground truth: swiss roll, 8 Gaussians, checkerboard, moons.

Scaled to roughly unit spread, so they are modelled as-is (no normalisation).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from datamodules.base import ArrayDataModule
from difflab.errors import ConfigError


def _swiss_roll(n: int, g: torch.Generator) -> torch.Tensor:
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g))
    x = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1)
    return (x + 0.5 * torch.randn(n, 2, generator=g)) / 5.0


def _eight_gaussians(n: int, g: torch.Generator) -> torch.Tensor:
    angles = 2 * math.pi * torch.randint(0, 8, (n,), generator=g) / 8
    centers = 2.0 * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    return centers + 0.2 * torch.randn(n, 2, generator=g)


def _checkerboard(n: int, g: torch.Generator) -> torch.Tensor:
    # 4x4 board on [-2, 2]^2; points only on the squares where floor(x) + floor(y) is even.
    x1 = 4 * torch.rand(n, generator=g) - 2
    x2 = torch.rand(n, generator=g) - 2 * torch.randint(0, 2, (n,), generator=g).float()
    x2 = x2 + torch.floor(x1) % 2
    return torch.stack([x1, x2], dim=1)


def _moons(n: int, g: torch.Generator) -> torch.Tensor:
    upper = torch.rand(n, generator=g) < 0.5
    theta = math.pi * torch.rand(n, generator=g)
    x = torch.where(upper, torch.cos(theta), 1 - torch.cos(theta))
    y = torch.where(upper, torch.sin(theta), 0.5 - torch.sin(theta))
    pts = torch.stack([x - 0.5, y - 0.25], dim=1) * 1.5
    return pts + 0.05 * torch.randn(n, 2, generator=g)


TOY_DISTRIBUTIONS = {
    "swiss_roll": _swiss_roll,
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "moons": _moons,
}


def sample_toy(name: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    if name not in TOY_DISTRIBUTIONS:
        raise ConfigError(f"unknown toy distribution {name!r}: data.name must be one of {sorted(TOY_DISTRIBUTIONS)}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    return TOY_DISTRIBUTIONS[name](n, generator).float()


class Toy2DDataModule(ArrayDataModule):
    """Fresh seeded draws from a named 2-D distribution; batches are {'x': (B, 2)}."""

    data_kind = "points"

    def __init__(self, name: str = "swiss_roll", num_train: int = 20000, num_val: int = 2000, seed: int = 0, batch_size: int = 256, num_workers: int = 0):
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if name not in TOY_DISTRIBUTIONS:
            raise ConfigError(f"unknown toy distribution {name!r}: data.name must be one of {sorted(TOY_DISTRIBUTIONS)}")
        self.name = name
        self.num_train = num_train
        self.num_val = num_val
        self.seed = seed
        self.data_shape = (2,)
        self.cond_dim = None

    def load_split(self, split: str) -> torch.Tensor:
        n, offset = (self.num_train, 0) if split == "train" else (self.num_val, 1)
        return sample_toy(self.name, n, torch.Generator().manual_seed(self.seed * 2 + offset))

    def ground_truth(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return sample_toy(self.name, n, generator)

    def render(self, x: torch.Tensor) -> np.ndarray:
        from difflab.pictures import scatter_over_reference

        reference = sample_toy(self.name, 2000, torch.Generator().manual_seed(10_000 + self.seed))
        return scatter_over_reference(x, reference, title=self.name)

    def make_metric(self):
        from evaluation.sliced_wasserstein import SlicedWassersteinToReference

        return SlicedWassersteinToReference(lambda n, g: sample_toy(self.name, n, g), seed=1000 + self.seed)
