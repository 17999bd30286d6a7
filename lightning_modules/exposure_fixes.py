"""Sampling-time exposure-bias fixes as wrappers around a denoiser or a grid, not parameters of the samplers.

- Epsilon Scaling (Ning et al. 2024): the sampler sees eps / lambda. In the VE form eps = (x - D) / sigma, so the
  wrapped denoiser is D' = x - (x - D) / lambda; every sampler, of every method, then steps with the scaled eps.
- Time-step shifting (Li et al. 2024): before each step, re-read each sample at the DDPM level whose forward
  variance fits it. In VP coordinates the state stays and its level changes; in the VE form that is the new
  level and the state rescaled by sqrt(abar_nominal / abar_new), handed to the sampler by its `reread` hook.
"""

from __future__ import annotations

from typing import Callable

import torch

from lightning_modules.schedules import DiscreteSchedule
from samplers.core import bcast

EPS_SCALE_SCHEDULES = ("constant", "linear")


def scale_eps(denoiser: Callable, lam: Callable[[torch.Tensor], torch.Tensor] | float) -> Callable:
    """D' = x - (x - D) / lambda(sigma); `lam` a constant or a function of the (B,) sigmas."""
    if not callable(lam) and float(lam) == 1.0:
        return denoiser  # bitwise the unscaled sampler

    def scaled(x, sigma):
        d = denoiser(x, sigma)
        factor = lam(sigma) if callable(lam) else lam
        return x - (x - d) / bcast(factor, x)

    return scaled


def element_var(x: torch.Tensor) -> torch.Tensor:
    if x[0].numel() < 2:
        raise ValueError("time_shift_window > 0 matches each sample's variance over its elements: it needs samples with 2+ elements")
    return x.flatten(1).var(dim=1)


def shift_levels(x: torch.Tensor, nominal: int, schedule: DiscreteSchedule, window: int, lowest: int,
                 data_var: torch.Tensor) -> torch.Tensor:
    """Per sample (x in VP coordinates), the level within +-window of `nominal`, kept in [lowest, T-1], whose
    forward element variance abar * data_var + (1 - abar) is closest to the sample's own element variance.

    The authors' code matches to 1 - abar alone (data_var = 0); the data term is our reading, so that shifting
    still means something at low noise. Needs many elements per sample (images), where the element variance
    concentrates; on 2-D toy data it is mostly noise.
    """
    hi = min(nominal + window, schedule.num_timesteps - 1)
    candidates = torch.arange(max(nominal - window, lowest), hi + 1, device=x.device)
    abar = schedule.alphas_cumprod[candidates].to(x.dtype)
    target = abar[None] * data_var.to(x.dtype).view(-1, 1) + (1 - abar[None])  # (B or 1, C)
    return candidates[(element_var(x)[:, None] - target).abs().argmin(dim=1)]


class TimeShift:
    """Li et al.'s time shifting on a DDPM's grid of levels `levels` (indices, decreasing, data last as -1).

    wrap(denoiser) records the first x0 prediction (its per-sample element variance is the data variance when
    data_var is None); reread(i, x, sigma) moves each row to its shifted level. x_T is drawn at the top level by
    construction, so the first step is never shifted; nor are levels at or below `cutoff`.
    """

    def __init__(self, schedule: DiscreteSchedule, levels: list[int], window: int, cutoff: int = 0,
                 data_var: float | None = None):
        if window < 0 or cutoff < 0:
            raise ValueError("time_shift_window and time_shift_cutoff must be >= 0")
        self.schedule, self.levels, self.window, self.cutoff = schedule, levels, window, cutoff
        self.table = schedule.sigmas()
        self.data_var = None if data_var is None else torch.as_tensor(float(data_var))

    def wrap(self, denoiser: Callable) -> Callable:
        def observed(x, sigma):
            d = denoiser(x, sigma)
            if self.data_var is None:
                self.data_var = element_var(d)
            return d

        return observed

    def reread(self, i: int, x: torch.Tensor, sigma: torch.Tensor):
        nominal = self.levels[i]
        if self.window == 0 or i == 0 or nominal <= self.cutoff:
            return x, sigma
        nxt = self.levels[i + 1]
        lowest = 0 if nxt < 0 else nxt + 1  # the shifted level stays above the next nominal one
        x_vp = x * bcast(torch.rsqrt(1 + sigma.double() ** 2), x)
        t = shift_levels(x_vp, nominal, self.schedule, self.window, lowest, self.data_var.to(x.device))
        new = self.table.to(x.device)[t].to(x.dtype)
        return x_vp * bcast(torch.sqrt(1 + new.double() ** 2), x), new
