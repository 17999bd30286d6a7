"""Consistency sampling (Song et al. 2023, Algorithm 1) of a consistency function f(x, sigma) -> x at sigma_min."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

import samplers.grids as grids
from samplers.core import Callback, Watch, batch_sigma, noise


@torch.no_grad()
def multistep(f, x: torch.Tensor, sigmas, generator=None, callback: Callback | None = None, progress=False,
              sigma_min: float = 0.002):
    """x = f(x_T, sigmas[0]); then per level s: x = f(x + sqrt(s^2 - sigma_min^2) z, s). One evaluation a level;
    f's outputs sit at sigma_min, so reaching s takes only the missing variance. A trailing 0 is ignored."""
    levels = [s for s in grids.check(sigmas) if s > 0]
    watch = Watch(callback)
    for i, s in enumerate(tqdm(levels, disable=not progress, desc="cm")):
        if i > 0:
            x = x + math.sqrt(max(s**2 - sigma_min**2, 0.0)) * noise(x, generator)
        sig = batch_sigma(s, x)
        watch(i, sig, x)
        x = f(x, sig)
    return x
