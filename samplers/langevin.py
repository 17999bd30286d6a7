"""Langevin dynamics on a denoiser's score s(x; sigma) = (D(x; sigma) - x) / sigma^2 (Tweedie)."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

import samplers.grids as grids
from samplers.core import Callback, Denoiser, Watch, batch_sigma, noise


def langevin_step(x: torch.Tensor, score: torch.Tensor, step_size: float, generator) -> torch.Tensor:
    """x + alpha s(x) + sqrt(2 alpha) z (Song & Ermon 2019, eq. 4 with eps = 2 alpha)."""
    return x + step_size * score + math.sqrt(2 * step_size) * noise(x, generator)


@torch.no_grad()
def annealed_langevin(denoiser: Denoiser, x: torch.Tensor, sigmas, generator=None, callback: Callback | None = None,
                      progress=False, n_steps_each: int = 100, step_lr: float = 2e-5):
    """Song & Ermon 2019, Algorithm 1: n_steps_each steps per positive level with alpha_i = eps sigma_i^2 / sigma_L^2;
    a final 0 in the grid adds NCSNv2's denoising step x + sigma_L^2 s(x; sigma_L) = D(x; sigma_L)."""
    levels, watch = grids.check(sigmas), Watch(callback)
    positive = [s for s in levels if s > 0]
    with tqdm(total=len(positive) * n_steps_each, disable=not progress, desc="annealed langevin") as bar:
        for i, s in enumerate(positive):
            sig = batch_sigma(s, x)
            watch(i, sig, x)
            alpha = step_lr * (s / positive[-1]) ** 2
            for _ in range(n_steps_each):
                x = langevin_step(x, (denoiser(x, sig) - x) / s**2, alpha, generator)
            bar.update(n_steps_each)
    if levels[-1] == 0:
        x = denoiser(x, batch_sigma(positive[-1], x))
    return x


@torch.no_grad()
def langevin(denoiser: Denoiser, x: torch.Tensor, sigmas, generator=None, callback: Callback | None = None,
             progress=False, n_steps: int = 1000, step_size: float = 5e-5):
    """Unadjusted Langevin at the grid's lowest positive level only: it mixes slowly between modes and gets
    their weights wrong in low-density regions (Song & Ermon 2019, Sec. 3), the reason for annealing."""
    levels, watch = grids.check(sigmas), Watch(callback)
    s = [v for v in levels if v > 0][-1]
    sig = batch_sigma(s, x)
    for i in tqdm(range(n_steps), disable=not progress, desc="langevin"):
        watch(i, sig, x)
        x = langevin_step(x, (denoiser(x, sig) - x) / s**2, step_size, generator)
    return x
