"""MeanFlow sampling (Geng et al. 2025): jumps z_r = z_t - (t - r) u(z_t, r, t) of an average-velocity model.

The model hands the sampler its flow map between two VE levels, jump(x, sigma, sigma_next) (the method converts to
its path's time and back), so one evaluation moves the state the whole interval: one step from the top level to 0
is one-step generation, more steps split [0, t_max] at the grid's levels.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

import samplers.grids as grids
from samplers.core import Callback, Watch, batch_sigma


@torch.no_grad()
def jumps(jump, x: torch.Tensor, sigmas, generator=None, callback: Callback | None = None, progress=False):
    """x <- jump(x, sigma_i, sigma_{i+1}) along the grid: one evaluation a step, deterministic."""
    levels = grids.check(sigmas)
    watch = Watch(callback)
    for i in tqdm(range(len(levels) - 1), disable=not progress, desc="mean_flow"):
        sigma = batch_sigma(levels[i], x)
        watch(i, sigma, x)
        x = jump(x, sigma, batch_sigma(levels[i + 1], x))
    return x
