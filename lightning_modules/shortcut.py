"""Shortcut models (Frans et al. 2025): one- and few-step generation from scratch, without a Jacobian-vector product.

The net is MeanFlow's average velocity u(z_t, r, t) over [r, t] (the step size d = t - r is its second input), so
the same `mean_flow` sampler jumps with it. Training mixes two targets in each batch:
- flow matching at d = 0 (r = t), u(z_t, t, t) -> n - x0, for a 1 - `model.self_consistency` share;
- self-consistency for the rest: two half steps of size d make one step of 2d,
      u(z_t, t - 2d, t) -> (u(z_t, t - d, t) + u(z', t - 2d, t - d)) / 2,   z' = z_t - d u(z_t, t - d, t),
  the target without gradient, with d a power of two, 2d = 2^-k for k = 0 .. log2(`model.min_steps`), and t uniform
  on [2d, 1].
Exact average velocities satisfy both (the flow map composes), so they are the loss's optimum.
"""

from __future__ import annotations

import math

import torch

from difflab.errors import ConfigError
from lightning_modules.mean_flow import MeanFlow
from lightning_modules.paths import bcast


class Shortcut(MeanFlow):
    def __init__(self, net, optimizer, scheduler=None, data_shape=(), cond_dim=None, clip_denoised: bool = False,
                 self_consistency: float = 0.25, min_steps: int = 128, t_max: float = 0.999, sampling: dict | None = None):
        super().__init__(net, optimizer, scheduler, data_shape, cond_dim, clip_denoised, t_max=t_max, sampling=sampling)
        if not 0.0 <= self_consistency < 1.0:
            raise ConfigError(f"model.self_consistency={self_consistency} is not valid: the share of the batch trained on "
                              "two half steps, in [0, 1)")
        if min_steps < 1 or min_steps & (min_steps - 1):
            raise ConfigError(f"model.min_steps={min_steps} is not valid: a power of two (the finest step is 1 / min_steps)")
        self.self_consistency, self.min_steps = float(self_consistency), int(min_steps)

    def draw_d_t(self, n: int, device, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Half-step sizes d with 2d = 2^-k, k uniform on 0 .. log2(min_steps), and t uniform on [2d, 1]."""
        levels = int(math.log2(self.min_steps)) + 1
        k = torch.randint(0, levels, (n,), device=device, generator=generator)
        two_d = torch.pow(2.0, -k.float())
        t = two_d + (1 - two_d) * torch.rand(n, device=device, generator=generator)
        return two_d / 2, t

    def loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        x0, cond = batch["x"], batch.get("cond")
        n = x0.shape[0]
        n_sc = int(round(self.self_consistency * n))
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        t_fm = torch.rand(n - n_sc, device=x0.device, generator=generator).to(x0.dtype)
        d, t_sc = self.draw_d_t(n_sc, x0.device, generator)
        d, t_sc = d.to(x0.dtype), t_sc.to(x0.dtype)
        t = torch.cat([t_fm, t_sc])
        r = torch.cat([t_fm, t_sc - 2 * d])
        z = self.path.perturb(x0, t, noise)
        target = self.path.velocity_target(x0, t, noise).clone()
        if n_sc:
            sub = slice(n - n_sc, n)
            c = None if cond is None else cond[sub]
            with torch.no_grad():
                first = self.average_velocity(z[sub], t_sc - d, t_sc, c)
                mid = z[sub] - bcast(d, first) * first
                second = self.average_velocity(mid, t_sc - 2 * d, t_sc - d, c)
            target[sub] = (first + second) / 2
        u = self.average_velocity(z, r, t, cond)
        return (u - target).pow(2).mean()
