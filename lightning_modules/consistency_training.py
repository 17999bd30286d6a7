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
from lightning_modules.consistency import ConsistencyModel, ict_pair_probs  # noqa: F401 (ict_pair_probs: its old home)


def ict_num_scales(k: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's curriculum N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1 / s0) + 1))."""
    stage = max(math.floor(total_steps / (math.log2(s1 // s0) + 1)), 1)
    return min(s0 * 2 ** (k // stage), s1) + 1


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
        **shared,  # ConsistencyModel's: sigma_data, sigma_min, sigma_max, rho, mu, loss, huber_c, cm_sigmas, sampling
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
        return self.grid_pair(self.num_scales_at(self.global_step), batch_size, device, generator, self.p_mean, self.p_std)

    def lower_point(self, x0, x_hi, z, sigma_hi, sigma_lo, cond):
        # The teacher-free estimate: x + sigma_n z with the same z lies on the same trajectory in expectation.
        shape = (-1, *([1] * (x0.dim() - 1)))
        return x0 + sigma_lo.to(x0.dtype).reshape(shape) * z, 1.0 / (sigma_hi - sigma_lo)

    def schedule_logs(self) -> dict[str, float]:
        """What the curriculum is at now, logged every step."""
        return {"train/num_scales": float(self.num_scales_at(self.global_step))}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        for name, value in self.schedule_logs().items():
            self.log(name, value, on_step=True, on_epoch=False)
        return loss
