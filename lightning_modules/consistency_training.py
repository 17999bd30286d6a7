"""Improved consistency training (iCT; Song & Dhariwal 2023), no teacher: model=consistency_training.

x_n = x + sigma_n z with the SAME z as x_{n+1} = x + sigma_{n+1} z (the one-sample estimate of a teacher's
ODE step), N(k) doubling from s0 to s1 over training, pairs drawn with the log-normal mass between their
levels, lambda = 1 / (sigma_{n+1} - sigma_n), pseudo-Huber distance and a stop-gradient target (mu = 0:
iCT's analysis shows an EMA target biases consistency training).
"""

from __future__ import annotations

import math

import torch

from difflab.errors import ConfigError
from lightning_modules.consistency import ConsistencyModel


def ict_num_scales(k: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's curriculum N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1 / s0) + 1))."""
    stage = max(math.floor(total_steps / (math.log2(s1 // s0) + 1)), 1)
    return min(s0 * 2 ** (k // stage), s1) + 1


def ict_pair_probs(sigmas: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """p(i) for the pair (sigma_i, sigma_{i+1}) of an ascending grid: the log-normal mass between them, normalized."""
    log_s = sigmas.double().log()
    cdf = torch.special.erf((log_s - p_mean) / (math.sqrt(2) * p_std))
    mass = cdf[1:] - cdf[:-1]
    return mass / mass.sum()


class ConsistencyTraining(ConsistencyModel):
    """A consistency model trained from data alone."""

    default_mu = 0.0
    default_loss = "pseudo_huber"

    def __init__(
        self,
        net,
        optimizer,
        scheduler=None,
        data_shape=(),
        cond_dim=None,
        clip_denoised: bool = False,
        s0: int = 10,
        s1: int = 1280,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        total_steps: int | None = None,
        **shared,  # ConsistencyModel's: sigma_data, sigma_min, sigma_max, rho, mu, loss, huber_c, sampler, sample_steps, cm_sigmas
    ):
        super().__init__(net, optimizer, scheduler, data_shape, cond_dim, clip_denoised, **shared)
        if s0 < 1 or s1 < s0:
            raise ConfigError(f"need 1 <= model.s0 <= model.s1 (the curriculum's first and last level counts), got {s0}, {s1}")
        if p_std <= 0:
            raise ConfigError(f"model.p_std must be positive, got {p_std}")
        self.s0, self.s1 = int(s0), int(s1)
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.total_steps = None if total_steps is None else int(total_steps)
        self.check_default_sampler()

    def curriculum_total_steps(self) -> int:
        return self.training_length("consistency training grows N over training")

    def num_scales_at(self, step: int) -> int:
        return ict_num_scales(step, self.curriculum_total_steps(), self.s0, self.s1)

    def pair(self, batch_size: int, device, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Adjacent levels of the current N(k)-level grid, drawn with iCT's log-normal pair weights."""
        n_levels = self.num_scales_at(self.global_step)
        grid = self.train_grid(n_levels, device)
        key = (n_levels, str(device), "probs")
        if key not in self._grid_cache:
            self._grid_cache[key] = ict_pair_probs(grid, self.p_mean, self.p_std)
        idx = torch.multinomial(self._grid_cache[key], batch_size, replacement=True, generator=generator)
        return grid[idx], grid[idx + 1]

    def lower_point(self, x0, x_hi, z, sigma_hi, sigma_lo, cond):
        # The teacher-free estimate: x + sigma_n z with the same z lies on the same trajectory in expectation.
        shape = (-1, *([1] * (x0.dim() - 1)))
        return x0 + sigma_lo.to(x0.dtype).reshape(shape) * z, 1.0 / (sigma_hi - sigma_lo)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train/num_scales", float(self.num_scales_at(self.global_step)), on_step=True, on_epoch=False)
        return loss
