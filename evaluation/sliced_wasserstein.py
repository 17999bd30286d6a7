"""Sliced Wasserstein-1 distance, for low-dimensional data with a known sampler (the 2-D toys)."""

from __future__ import annotations

from typing import Callable

import torch


def _wasserstein1_sorted(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Exact W1 per column between empirical distributions given column-sorted (N, P) and (M, P).

    W1 in 1-D is the integral over t in (0, 1) of |F^-1(t) - G^-1(t)|. Both
    empirical quantile functions are piecewise constant with breaks at i/N and
    j/M, so integrating over the merged breakpoints is exact for any N and M.
    """
    n, m = len(xs), len(ys)
    if n == m:
        return (xs - ys).abs().mean(0)
    levels = torch.cat([torch.arange(1, n + 1, dtype=torch.float64) / n, torch.arange(1, m + 1, dtype=torch.float64) / m])
    levels = torch.unique(torch.cat([torch.zeros(1, dtype=torch.float64), levels]))  # sorted, starts at 0
    widths = levels[1:] - levels[:-1]
    mids = (levels[1:] + levels[:-1]) / 2
    ix = (mids * n).long().clamp_max(n - 1)
    iy = (mids * m).long().clamp_max(m - 1)
    return (widths[:, None] * (xs[ix] - ys[iy]).abs()).sum(0)


def sliced_wasserstein(
    x: torch.Tensor,
    y: torch.Tensor,
    num_projections: int = 256,
    generator: torch.Generator | None = None,
) -> float:
    """Mean over random unit directions of the 1-D W1 between the projections of x (N, D) and y (M, D).

    Without a generator the directions come from a fixed seed, so repeated calls
    on the same data agree and scores of different models share directions.
    """
    x = torch.as_tensor(x).detach().to("cpu", torch.float64).flatten(1)
    y = torch.as_tensor(y).detach().to("cpu", torch.float64).flatten(1)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch: {x.shape[1]} vs {y.shape[1]}")
    if len(x) == 0 or len(y) == 0:
        raise ValueError("both sample sets must be non-empty")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    dirs = torch.randn(x.shape[1], num_projections, generator=generator, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    xs = (x @ dirs).sort(dim=0).values
    ys = (y @ dirs).sort(dim=0).values
    return _wasserstein1_sorted(xs, ys).mean().item()


class SlicedWassersteinToReference:
    """Sliced W1 of samples to a fixed reference set drawn from the true sampler.

    The reference and the projection directions are fixed by `seed`, so scores
    across epochs and models differ only through the samples.
    """

    name = "sliced_w1"

    def __init__(
        self,
        sample_fn: Callable[[int, torch.Generator], torch.Tensor],
        num_reference: int = 5000,
        num_projections: int = 256,
        seed: int = 0,
    ):
        self.sample_fn = sample_fn
        self.num_reference = num_reference
        self.num_projections = num_projections
        self.seed = seed
        self.reference = torch.as_tensor(sample_fn(num_reference, torch.Generator().manual_seed(seed))).detach().cpu()
        self._floors: dict[int, float] = {}

    def __call__(self, samples: torch.Tensor) -> float:
        gen = torch.Generator().manual_seed(self.seed + 1)
        return sliced_wasserstein(samples, self.reference, self.num_projections, generator=gen)

    def floor(self, n: int | None = None) -> float:
        """Score of n fresh true samples (independent of the reference); default n = num_reference.

        This is what a perfect sampler gets, so it is the floor for samples of
        size n; it shrinks roughly like 1/sqrt(n), so compare at equal n.
        """
        n = self.num_reference if n is None else n
        if n not in self._floors:
            fresh = self.sample_fn(n, torch.Generator().manual_seed(self.seed + 2))
            self._floors[n] = self(fresh)
        return self._floors[n]
