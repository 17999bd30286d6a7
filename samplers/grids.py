"""Noise-level grids in the one VE form (x = x0 + sigma n): decreasing float64 sigmas, usually ending at 0.

A grid says where a sampler evaluates the denoiser; it is not a sampler. Every method's native levels are
here: Karras et al.'s rho-spaced grid (EDM, consistency), NCSN's geometric levels, a discrete DDPM table's
levels picked uniformly, quadratically or by Karras spacing, and the uniform time grid of a continuous
schedule (score SDEs, flow matching) mapped through its sigma(t).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

SPACINGS = ("uniform", "quadratic", "karras", "leading")


def karras(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: n levels from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho).

    rho = 7 spends most steps at small sigma, where the ODE's curvature (and a step's error) is largest.
    """
    if n < 1:
        raise ValueError(f"need at least one noise level, got n={n}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if n == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    # Pin the ends: the power round trip is off by an ulp, and callers compare sigmas[0] to sigma_max.
    sigmas[0], sigmas[-1] = sigma_max, sigma_min
    return sigmas


def geometric(sigma_max: float, sigma_min: float, n: int) -> torch.Tensor:
    """sigma_1 > ... > sigma_n with a constant ratio (Song & Ermon 2019, Sec. 4.2)."""
    if n < 1 or not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need n >= 1 and 0 < sigma_min <= sigma_max, got {n}, {sigma_min}, {sigma_max}")
    if n == 1:
        return torch.tensor([float(sigma_min)], dtype=torch.float64)
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64))


def discrete_levels(sigmas: torch.Tensor, steps: int, spacing: str = "uniform", rho: float = 7.0) -> torch.Tensor:
    """Indices into an increasing table of trained levels (DDPM: sigma_t for t = 0..T-1), from T-1 down to 0.

    uniform:   evenly spaced in t (Lin et al. 2024's 'trailing': the first level is T-1, pure noise);
    quadratic: t_k = (T-1) (1 - k/(steps-1))^2, bunched near the data (Song et al. 2021's CIFAR-10 choice);
    karras:    evenly spaced in sigma^(1/rho), each rounded to the nearest level in log sigma;
    leading:   k * (T // steps) for k = steps-1 .. 0, diffusers' default 'leading' spacing (the top level is below
               T-1 unless steps = T): what LeRobot's and diffusers' DDIM visit.
    Rounding can make neighbours equal; they are pushed apart by one level, so there are always `steps`.
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
    num = sigmas.numel()
    if not 1 <= steps <= num:
        raise ValueError(f"steps must be in [1, {num}] (the number of trained levels), got {steps}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    top = num - 1
    frac = torch.linspace(1.0, 0.0, steps, dtype=torch.float64)
    if spacing == "uniform":
        return (frac * top).round().long()
    if spacing == "leading":
        return torch.arange(steps - 1, -1, -1, dtype=torch.long) * (num // steps)
    if spacing == "quadratic":
        levels = (frac**2 * top).round().long()
    else:
        lo, hi = sigmas[0] ** (1 / rho), sigmas[top] ** (1 / rho)
        wanted = (rho * torch.log(lo + frac * (hi - lo))).unsqueeze(1)
        levels = (sigmas.log().unsqueeze(0) - wanted).abs().argmin(1)
    out = levels.tolist()
    for k in range(steps - 2, -1, -1):  # push equal neighbours apart, from the data end up
        out[k] = max(out[k], out[k + 1] + 1)
    return torch.tensor([min(t, top - k) for k, t in enumerate(out)], dtype=torch.long)


def time_uniform(sigma_of_t: Callable[[torch.Tensor], torch.Tensor], steps: int, t_max: float, t_min: float) -> torch.Tensor:
    """sigma(t) on steps + 1 evenly spaced times t_max -> t_min (score SDEs' and flow matching's native grid)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return sigma_of_t(torch.linspace(t_max, t_min, steps + 1, dtype=torch.float64)).double()


def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def check(sigmas: torch.Tensor) -> list[float]:
    """The grid as Python floats (host arithmetic, no device syncs in the loops) after checking its shape."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
    if sigmas.numel() < 1 or (sigmas[:-1] <= 0).any() or (sigmas[-1] < 0) or (sigmas[1:] >= sigmas[:-1]).any():
        raise ValueError("a grid must be strictly decreasing and positive (only its last level may be 0)")
    return sigmas.tolist()
