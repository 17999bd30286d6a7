"""Easy consistency tuning (ECT; Geng, Pokle, Luo, Lin & Kolter 2024, "Consistency Models Made Easy"):
model=consistency_tuning.

Start from a pretrained EDM model (model.init_ckpt, the same net) and train it with consistency training's
teacher-free pairs: sigma_hi = t ~ log-normal(p_mean, p_std), x_t = x + t z and x_r = x + r z with the SAME z,
lambda = 1 / (t - r), pseudo-Huber distance, stop-gradient target (mu = 0). Where consistency training moves
over a grid of levels that grows finer, ECT maps t to r continuously,

    r = t (1 - q^-(stage + 1) n(t)),  n(t) = 1 + k sigmoid(-b t),

with the stage rising from 0 to num_stages - 1 over training: at first r is 0 (clamped here to sigma_min) for
most t, which is the diffusion loss the model was pretrained on, and every stage divides the gap t - r by q,
so the model is tuned from denoiser to consistency function. n(t) keeps the gap wider at small t, where the
pretrained denoiser is already near consistent.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_info

from difflab.errors import ConfigError
from lightning_modules.consistency_training import ConsistencyTraining


def ect_stage(step: int, total_steps: int, num_stages: int) -> int:
    """The stage at optimizer step `step`: num_stages equal parts of the run, 0-based."""
    return min(step * num_stages // max(total_steps, 1), num_stages - 1)


def ect_lower_sigma(t: torch.Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0) -> torch.Tensor:
    """ECT's r(t) = t (1 - q^-(stage + 1) (1 + k sigmoid(-b t))), clamped at 0."""
    shrink = q ** -(stage + 1) * (1 + k * torch.sigmoid(-b * t))
    return (t * (1 - shrink)).clamp(min=0.0)


class ConsistencyTuning(ConsistencyTraining):
    """A pretrained EDM model tuned into a consistency model."""

    def __init__(
        self,
        net,
        optimizer,
        scheduler=None,
        data_shape=(),
        cond_dim=None,
        clip_denoised: bool = False,
        init_ckpt: str | None = None,
        q: float = 2.0,
        k: float = 8.0,
        b: float = 1.0,
        num_stages: int = 8,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        total_steps: int | None = None,
        **shared,  # ConsistencyModel's: sigma_data, sigma_min, sigma_max, rho, mu, loss, huber_c, cm_sigmas, sampling, ...
    ):
        super().__init__(net, optimizer, scheduler, data_shape, cond_dim, clip_denoised, p_mean=p_mean, p_std=p_std,
                         total_steps=total_steps, **shared)
        if q <= 1 or k < 0 or b <= 0 or num_stages < 1:
            raise ConfigError(f"need model.q > 1, model.k >= 0, model.b > 0 and model.num_stages >= 1, got {q}, {k}, {b}, {num_stages}")
        self.init_ckpt = init_ckpt
        self.q, self.k, self.b = float(q), float(k), float(b)
        self.num_stages = int(num_stages)

    def stage_at(self, step: int) -> int:
        return ect_stage(step, self.training_length("consistency tuning shrinks dt over training"), self.num_stages)

    def pair(self, batch_size: int, device, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(r, t): t log-normal within [2 sigma_min, sigma_max], r = ECT's map of t, at least sigma_min."""
        normal = torch.randn(batch_size, device=device, dtype=torch.float64, generator=generator)
        # t >= 2 sigma_min keeps the weight 1 / (t - r) <= 1 / sigma_min, ECT's own bound (its r may reach 0).
        t = (self.p_mean + self.p_std * normal).exp().clamp(2 * self.sigma_min, self.sigma_max)
        r = ect_lower_sigma(t, self.stage_at(self.global_step), self.q, self.k, self.b).clamp(min=self.sigma_min)
        return r, t

    def schedule_logs(self) -> dict[str, float]:
        stage = self.stage_at(self.global_step)
        return {"train/ect_stage": float(stage), "train/dt_ratio": self.q ** -(stage + 1)}

    # --- Lightning -----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit" or self.resuming():
            return
        from lightning_modules.teachers import load_teacher

        if not self.init_ckpt:
            raise ConfigError("consistency tuning (model=consistency_tuning) starts from a pretrained model: pass "
                              "model.init_ckpt=PATH (a .ckpt of model=edm with the same net.*, written by train.py on the "
                              "same data), or use model=consistency_training to train from scratch")
        source = load_teacher(self.init_ckpt, self.data_shape, self.cond_dim, obs_spec=self.obs_spec)
        why = self.warm_start_refusal(source)
        if why is not None:
            raise ConfigError(f"model.init_ckpt={self.init_ckpt} cannot start consistency tuning: {why}; use a "
                              f"model=edm checkpoint trained with this run's net.* and model.sigma_data")
        self.warm_start_from(source)
        rank_zero_info(f"consistency tuning: {self.num_stages} stages, gap t - r divided by {self.q:g} each "
                       f"(last stage: {self.q ** -self.num_stages:.3g} t at large t)")
        del source
