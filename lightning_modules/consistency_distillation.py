"""Consistency distillation (CD; Song, Dhariwal, Chen & Sutskever 2023, Algorithm 2): model=consistency.

x_{n+1} = x + sigma_{n+1} z and x_n from one Heun step of the TEACHER's probability-flow ODE, on a fixed
Karras grid of N levels with a uniform pair index and lambda = 1. The teacher is any method with a VE-form
denoiser (`teachers.py`); an EDM teacher with the student's net also warm-starts the student (the paper
fine-tunes from the teacher). Default target: an EMA of the student with mu = 0.95 (the CM paper's
ImageNet-64 / LSUN value; its CIFAR-10 run used 0, which on the 2-D toys is far less stable), default
distance l2 (LPIPS needs weights this project cannot download).

iCT's choices are options here too (issue 19 measures them): pairs=lognormal (pairs drawn with the log-normal
mass between their levels), weighting=ict (lambda = 1 / (sigma_{n+1} - sigma_n)), loss=pseudo_huber, and a
finer grid (num_scales 40-80).
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from difflab.errors import ConfigError
from lightning_modules.consistency import ConsistencyModel
from lightning_modules.teachers import Teacher, load_teacher
from samplers.ode import heun_step


PAIRS = ("uniform", "lognormal")
WEIGHTINGS = ("uniform", "ict")


class ConsistencyDistillation(ConsistencyModel):
    """A consistency model distilled from a teacher checkpoint (model.teacher_ckpt)."""

    default_mu = 0.95
    default_loss = "l2"

    def __init__(
        self,
        net,
        optimizer,
        scheduler=None,
        data_shape=(),
        cond_dim=None,
        clip_denoised: bool = False,
        teacher_ckpt: str | None = None,
        warm_start: bool = True,
        num_scales: int = 18,
        pairs: str = "uniform",
        weighting: str = "uniform",
        p_mean: float = -1.1,
        p_std: float = 2.0,
        **shared,  # ConsistencyModel's: sigma_data, sigma_min, sigma_max, rho, mu, loss, huber_c, cm_sigmas, sampling
    ):
        super().__init__(net, optimizer, scheduler, data_shape, cond_dim, clip_denoised, **shared)
        if num_scales < 2:
            raise ConfigError(f"model.num_scales (the distillation grid's levels) must be >= 2, got {num_scales}")
        self.teacher_ckpt = teacher_ckpt
        self.warm_start = bool(warm_start)
        if pairs not in PAIRS or weighting not in WEIGHTINGS:
            raise ConfigError(f"model.pairs must be one of {PAIRS} and model.weighting one of {WEIGHTINGS}, got {pairs!r}, {weighting!r}")
        if p_std <= 0:
            raise ConfigError(f"model.p_std must be positive, got {p_std}")
        self.num_scales = int(num_scales)
        self.pairs, self.weighting = pairs, weighting
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.check_default_sampler()

    def pair(self, batch_size: int, device, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Adjacent levels of the fixed N-level grid: the pair index uniform (the CM paper) or log-normal (iCT)."""
        p_mean = self.p_mean if self.pairs == "lognormal" else None
        return self.grid_pair(self.num_scales, batch_size, device, generator, p_mean, self.p_std)

    def lower_point(self, x0, x_hi, z, sigma_hi, sigma_lo, cond):
        teacher = self._teacher_on(x0.device)
        with torch.no_grad():
            x_lo = heun_step(lambda x, s: teacher.denoise(x, s, cond), x_hi, sigma_hi, sigma_lo)
        weight = 1.0 / (sigma_hi - sigma_lo) if self.weighting == "ict" else torch.ones_like(sigma_lo)
        return x_lo, weight

    # --- the teacher ---------------------------------------------------------------------------
    @property
    def teacher(self) -> Teacher:
        """The frozen teacher, loaded from model.teacher_ckpt on first use; never saved with the student."""
        teacher = self.__dict__.get("_teacher")
        if teacher is None:
            if not self.teacher_ckpt:
                raise ConfigError(
                    "consistency distillation (model=consistency) needs a teacher: pass model.teacher_ckpt=PATH (a .ckpt of "
                    "model=edm, vesde, vpsde, subvpsde, ddpm, ncsn or flow_matching written by train.py on the same data), "
                    "or use model=consistency_training (no teacher)"
                )
            self.attach_teacher(load_teacher(self.teacher_ckpt, self.data_shape, self.cond_dim, obs_spec=self.obs_spec))
            teacher = self.__dict__["_teacher"]
        return teacher

    def attach_teacher(self, teacher: Teacher) -> None:
        """Use `teacher` and narrow [sigma_min, sigma_max] to the levels it was trained on (with a warning)."""
        lo, hi = self.sigma_min, self.sigma_max
        new_lo, new_hi = max(lo, teacher.sigma_min), min(hi, teacher.sigma_max)
        if new_lo >= new_hi:
            raise ConfigError(f"the teacher covers sigma in [{teacher.sigma_min:.4g}, {teacher.sigma_max:.4g}], which misses "
                              f"model.sigma_min..sigma_max = [{lo:.4g}, {hi:.4g}]")
        if (new_lo, new_hi) != (lo, hi):
            rank_zero_warn(
                f"the {teacher.kind} teacher was trained on sigma in [{teacher.sigma_min:.4g}, {teacher.sigma_max:.4g}]: "
                f"the consistency model uses sigma_min={new_lo:.4g}, sigma_max={new_hi:.4g} instead of {lo:.4g}, {hi:.4g}"
            )
            self._set_sigma_range(new_lo, new_hi)
            if self.cm_sigmas is not None:
                self.cm_sigmas = [min(self.cm_sigmas[0], new_hi), *self.cm_sigmas[1:]]
            self._check_cm_sigmas()
        self.__dict__["_teacher"] = teacher

    def _teacher_on(self, device: torch.device) -> Teacher:
        teacher = self.teacher
        if teacher.device is not None and teacher.device != device:
            teacher.to(device)
        return teacher

    # --- Lightning -----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        teacher = self.teacher  # fail before any training time is spent
        if self.warm_start and not self.resuming():
            why = self.warm_start_refusal(teacher)
            if why is None:
                self.warm_start_from(teacher)
            elif teacher.kind == "edm":
                rank_zero_warn(f"warm start skipped: the teacher's {why.removeprefix('its ')}; the student starts from scratch")
            else:
                rank_zero_info(f"warm start skipped: {why}")

    def on_fit_start(self) -> None:
        self._teacher_on(self.device)
