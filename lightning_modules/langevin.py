"""Langevin dynamics for a score: plain (one noise level) and annealed over noise levels (NCSN).

Plain functions of a score, so the NCSN module and tests with an analytic score
run the same code:
- annealed: `score_fn(x, i)` with i a (B,) long tensor indexing `sigmas` (largest first);
- plain: `score_fn(x)`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import tqdm


def geometric_sigmas(sigma_max: float, sigma_min: float, num_scales: int) -> torch.Tensor:
    """sigma_1 > ... > sigma_L with a constant ratio (Song & Ermon 2019, Sec. 4.2), float64."""
    if num_scales < 1 or not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need num_scales >= 1 and 0 < sigma_min <= sigma_max, got {num_scales}, {sigma_min}, {sigma_max}")
    if num_scales == 1:
        return torch.tensor([float(sigma_min)], dtype=torch.float64)
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), num_scales, dtype=torch.float64))


def sigma_max_from_data(x: torch.Tensor, max_points: int = 4096) -> float:
    """Largest pairwise Euclidean distance in the data (NCSNv2, Technique 1: sigma_1 of that size lets
    Langevin at the first level move between any two training points).

    Exact over at most `max_points` rows (the first ones; pass a shuffled set), in float64.
    """
    x = x.reshape(x.shape[0], -1)[:max_points].double()
    if x.shape[0] < 2:
        raise ValueError("sigma_max_from_data needs at least two data points")
    return torch.cdist(x, x).max().item()


def langevin_step(x: torch.Tensor, score: torch.Tensor, step_size: float, generator: torch.Generator | None) -> torch.Tensor:
    """x + alpha s(x) + sqrt(2 alpha) z (Song & Ermon 2019, eq. 4 with eps = 2 alpha)."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + step_size * score + math.sqrt(2 * step_size) * noise


@torch.no_grad()
def langevin(
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    x_init: torch.Tensor,
    n_steps: int,
    step_size: float,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Unadjusted Langevin dynamics with one score: mixes slowly between modes and gets their weights
    wrong in low-density regions (Song & Ermon 2019, Sec. 3), the reason for annealing."""
    x = x_init
    for _ in tqdm(range(n_steps), disable=not progress, desc="langevin"):
        x = langevin_step(x, score_fn(x), step_size, generator)
    return x


@torch.no_grad()
def annealed_langevin(
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sigmas: torch.Tensor,
    x_init: torch.Tensor,
    n_steps_each: int = 100,
    step_lr: float = 2e-5,
    denoise: bool = True,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Song & Ermon 2019, Algorithm 1: T Langevin steps per level with alpha_i = eps sigma_i^2 / sigma_L^2,
    then (NCSNv2, Sec. 3 / Appendix C.2) one denoising step x + sigma_L^2 s(x, sigma_L) (Tweedie's formula)."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    x = x_init
    levels = len(sigmas)
    with tqdm(total=levels * n_steps_each, disable=not progress, desc="annealed langevin") as bar:
        for i in range(levels):
            idx = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            alpha = step_lr * (sigmas[i] / sigmas[-1]).item() ** 2
            for _ in range(n_steps_each):
                x = langevin_step(x, score_fn(x, idx), alpha, generator)
            bar.update(n_steps_each)
    if denoise:
        idx = torch.full((x.shape[0],), levels - 1, dtype=torch.long, device=x.device)
        x = x + sigmas[-1].item() ** 2 * score_fn(x, idx)
    return x


def annealed_langevin_nfe(num_scales: int, n_steps_each: int, denoise: bool) -> int:
    return num_scales * n_steps_each + int(denoise)
