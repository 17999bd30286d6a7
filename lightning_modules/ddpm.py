"""DDPM (Ho et al. 2020) on a discrete schedule, as a VE-form denoiser for every sampler of the registry.

The net sees x_t in VP coordinates and its step index t; `denoise(x, sigma)` reads it in the one VE form by
x_VE = x_VP / sqrt(abar), sigma = sqrt((1 - abar) / abar). Its native grids are its trained levels: all T for
`ancestral` (Ho et al. Algorithm 2), `steps` of them (uniform, quadratic or Karras-spaced) for DDIM (Song et
al. 2021) and the other samplers. Exposure-bias options (Ning et al. 2023 DDPM-IP in training; Epsilon Scaling
and Li et al.'s time shifting at sampling, as wrappers in lightning_modules.exposure_fixes) are off by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from difflab.errors import ConfigError
from lightning_modules.base import DiffusionModule
from lightning_modules.exposure_fixes import EPS_SCALE_SCHEDULES, TimeShift
from lightning_modules.paths import DiscreteVPPath
from lightning_modules.schedules import DiscreteSchedule, make_betas
from samplers import grids
from samplers.core import batch_sigma, bcast

PREDICTIONS = ("eps", "x0", "v")
DDIM_SPACINGS = grids.SPACINGS
KARRAS_TOP_SIGMA = 1000.0  # Karras' grid was built for sigma_max = 80; a linear T = 1000 schedule tops at 157


class DDPM(DiffusionModule):
    """Denoising diffusion with a discrete schedule; the net sees the step index as its noise level."""

    fixed_grid = ("ancestral",)  # all model.num_timesteps levels
    quick_sampling = {"sampler": "ddim", "steps": 2}
    default_sampling = {"sampler": "ddim", "steps": 50, "options": {
        "eta": 0.0, "variance": "beta", "ddim_spacing": "uniform", "eps_scale": 1.0, "eps_scale_schedule": "constant",
        "eps_scale_slope": 0.0, "time_shift_window": 0, "time_shift_cutoff": 0, "time_shift_data_var": None}}

    def __init__(
        self,
        net,
        optimizer,
        scheduler=None,
        data_shape=(),
        cond_dim=None,
        clip_denoised: bool = False,
        num_timesteps: int = 1000,
        schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        prediction: str = "eps",
        input_perturbation: float = 0.0,
        sampling: dict | None = None,
    ):
        super().__init__(net, optimizer, scheduler, data_shape, cond_dim, clip_denoised, sampling)
        if prediction not in PREDICTIONS:
            raise ConfigError(f"model.prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if not 1 <= self.sample_steps <= num_timesteps:
            raise ConfigError(f"model.sampling.steps={self.sample_steps} must be in [1, model.num_timesteps={num_timesteps}]")
        self.schedule = DiscreteSchedule(make_betas(schedule, num_timesteps, beta_start, beta_end))
        self.path = DiscreteVPPath(self.schedule)
        self.schedule_name = schedule
        self.prediction = prediction
        if input_perturbation < 0:
            raise ConfigError(f"model.input_perturbation must be >= 0, got {input_perturbation}")
        self.input_perturbation = float(input_perturbation)
        self.check_exposure_options(self.sampling_options, "model.sampling.options.")
        self.check_default_sampler()

    def check_exposure_options(self, opts: dict, where: str) -> None:
        """Epsilon Scaling's lambda_t must stay > 0 (it divides eps); time shifting's window and cutoff are >= 0."""
        schedule, slope = opts.get("eps_scale_schedule", "constant"), float(opts.get("eps_scale_slope") or 0.0)
        if schedule not in EPS_SCALE_SCHEDULES:
            raise ConfigError(f"{where}eps_scale_schedule must be one of {EPS_SCALE_SCHEDULES}, got {schedule!r}")
        scale = opts.get("eps_scale")
        if scale is not None and min(scale, scale + slope * (self.num_timesteps - 1) * (schedule == "linear")) <= 0:
            raise ConfigError(f"{where}eps_scale (and eps_scale + eps_scale_slope * t over all t) must stay > 0: it divides eps")
        if int(opts.get("time_shift_window") or 0) < 0 or int(opts.get("time_shift_cutoff") or 0) < 0:
            raise ConfigError(f"{where}time_shift_window and {where}time_shift_cutoff must be >= 0")
        spacing = opts.get("ddim_spacing", "uniform")
        if spacing not in DDIM_SPACINGS:
            raise ConfigError(f"{where}ddim_spacing must be one of {DDIM_SPACINGS}, got {spacing!r}")
        self.check_spacing(spacing, f"{where}ddim_spacing")

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        """The net's output read as eps, whatever it was trained to predict."""
        out = self.net(x_t, t.float(), cond)
        if self.prediction == "eps":
            return out
        if self.prediction == "x0":
            return self.schedule.eps_from_x0(x_t, t, out)
        return self.schedule.eps_from_v(x_t, t, out)

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        return self.schedule.v_target(x0, t, noise)

    def perturb(self, noise: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """DDPM-IP (Ning et al. 2023): the noise that builds x_t is eps + gamma * xi, the target stays eps.

        xi is drawn only when gamma > 0, so with the option off the random stream is the one of plain DDPM.
        """
        if self.input_perturbation == 0:
            return noise
        xi = torch.randn(noise.shape, device=noise.device, dtype=noise.dtype, generator=generator)
        return noise + self.input_perturbation * xi

    def loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """L_simple (Ho et al. eq. 14): uniform t, unweighted MSE on the prediction target."""
        x0, cond = batch["x"], batch.get("cond")
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = self.path.perturb(x0, t, self.perturb(noise, generator))
        return F.mse_loss(self.net(x_t, t.float(), cond), self.target(x0, t, noise))

    # --- the VE-form denoiser ------------------------------------------------------------------
    @property
    def level_sigmas(self) -> torch.Tensor:
        """sigma_t of the T trained levels (float64, CPU, increasing), from the very buffers q_sample uses."""
        cached = self.__dict__.get("_level_sigmas")
        if cached is None:
            cached = self.__dict__["_level_sigmas"] = self.schedule.sigmas()
        return cached

    def _log_level_sigmas(self, device) -> torch.Tensor:
        # One copy per device: the denoiser runs every sampling step, and a fresh host-to-device copy each call
        # would sit in the hot loop on a GPU.
        cache = self.__dict__.setdefault("_log_level_sigmas_on", {})
        key = str(device)
        if key not in cache:
            cache[key] = self.level_sigmas.log().to(device)
        return cache[key]

    @property
    def sigma_range(self) -> tuple[float, float]:
        table = self.level_sigmas
        return float(table[0]), float(table[-1])

    def level_of(self, sigma: torch.Tensor) -> torch.Tensor:
        """The (fractional) step index with noise level sigma: linear in log sigma between two trained levels, as
        DPM-Solver's wrapper of discrete models does (the net is smooth in its noise-level input); snapped to the
        level itself within 1e-4 of it, so on its own grid the net sees exactly the integers it was trained on."""
        log_grid = self._log_level_sigmas(sigma.device)
        log_sigma = sigma.double().log().clamp(log_grid[0], log_grid[-1])
        hi = torch.searchsorted(log_grid, log_sigma).clamp(1, log_grid.numel() - 1)
        lo = hi - 1
        t = lo.double() + (log_sigma - log_grid[lo]) / (log_grid[hi] - log_grid[lo])
        return torch.where((t - t.round()).abs() < 1e-4, t.round(), t)

    def denoise(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        """D(x; sigma) for x = x0 + sigma n: the net fed x_VP = x / sqrt(1 + sigma^2) at its step index."""
        sigma = batch_sigma(sigma, x)
        t = self.level_of(sigma)
        scale = torch.rsqrt(1 + sigma.double() ** 2)  # sqrt(abar)
        x_vp = x * bcast(scale, x)
        out = self.net(x_vp, t.float(), cond).to(x.dtype)
        if self.prediction == "eps":
            return x - bcast(sigma, x) * out
        if self.prediction == "x0":
            return out
        # v = sqrt(abar) eps - sqrt(1 - abar) x0  =>  x0 = sqrt(abar) x_VP - sqrt(1 - abar) v
        return bcast(scale, x) * x_vp - bcast(sigma * scale, x) * out

    def check_spacing(self, spacing: str, setting: str) -> None:
        """Karras' rho = 7 spacing is dense where sigma is large; with a top level of 2e4 (cosine, T = 1000) it puts 13
        of 20 levels on the schedule's first 13 steps, so a solver's error stops falling with more steps: refused."""
        top = float(self.level_sigmas[-1])
        if spacing == "karras" and top > KARRAS_TOP_SIGMA:
            raise ConfigError(f"{setting}=karras on this schedule (top sigma {top:.3g} > {KARRAS_TOP_SIGMA:g}: "
                              f"model.schedule={self.schedule_name}) crowds its levels at pure noise; use "
                              f"{setting}=uniform or quadratic")

    def grid_levels(self, sampler: str, steps: int, ddim_spacing: str | None = None) -> list[int]:
        """The trained levels a sampler visits, top first (all of them for ancestral)."""
        if sampler == "ancestral":
            return list(range(self.num_timesteps - 1, -1, -1))
        if not 1 <= steps <= self.num_timesteps:
            raise ConfigError(f"steps must be in [1, {self.num_timesteps}] (model.num_timesteps), got {steps}")
        spacing = ddim_spacing or self.sampling_options.get("ddim_spacing", "uniform")
        if spacing not in DDIM_SPACINGS:
            raise ConfigError(f"ddim_spacing must be one of {DDIM_SPACINGS}, got {spacing!r}")
        self.check_spacing(spacing, "ddim_spacing")
        return grids.discrete_levels(self.level_sigmas, steps, spacing).tolist()

    def grid(self, sampler: str, steps: int, options: dict | None = None) -> torch.Tensor:
        spacing = (options or {}).get("ddim_spacing")
        return grids.append_zero(self.level_sigmas[self.grid_levels(sampler, steps, spacing)])

    # --- sampling options ------------------------------------------------------------------------
    @property
    def method_options(self) -> dict[str, tuple[str, ...]]:
        scaling = ("eps_scale_schedule", "eps_scale_slope")  # Epsilon Scaling's lambda_t, with eps_scale
        opts = {name: ("ddim_spacing", *scaling) for name in self.samplers() if name not in self.fixed_grid}
        opts["ancestral"] = scaling
        for name in ("ddim", "ancestral"):  # the samplers with a reread hook
            opts[name] = (*opts[name], "time_shift_window", "time_shift_cutoff", "time_shift_data_var")
        return opts

    def eps_lambda(self, eps_scale: float, options: dict | None = None):
        """Epsilon Scaling's lambda: a constant, or eps_scale + slope * t of the (fractional) step index."""
        options = self.sampling_options if options is None else options
        slope = float(options.get("eps_scale_slope") or 0.0)
        if options.get("eps_scale_schedule", "constant") == "constant" or slope == 0.0:
            return float(eps_scale)
        return lambda sigma: eps_scale + slope * self.level_of(sigma).to(sigma.dtype)

    def sampling_denoiser(self, cond, sampler: str, options: dict):
        denoiser = super().sampling_denoiser(cond, sampler, options)
        window = int(options.get("time_shift_window") or 0)
        if window and sampler in ("ddim", "ancestral"):
            levels = self.grid_levels(sampler, int(options["_steps"]), options.get("ddim_spacing")) + [-1]
            shift = TimeShift(self.schedule, levels, window, int(options.get("time_shift_cutoff") or 0),
                              options.get("time_shift_data_var"))
            options["reread"] = shift.reread
            denoiser = shift.wrap(denoiser)
        return denoiser

