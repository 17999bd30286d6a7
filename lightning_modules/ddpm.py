"""DDPM (Ho et al. 2020) with ancestral sampling and DDIM (Song et al. 2021).

The samplers are plain functions of an eps-model `eps_fn(x_t, t) -> eps`, so
tests can run them on an analytic eps and other methods (scheduled sampling)
can reuse them unchanged.

Exposure-bias options, all off by default (Ning et al. 2023, DDPM-IP; Ning et al.
2024, Epsilon Scaling; Li et al. 2024, time-step shifting), and a `callback` /
`return_trajectory` on both samplers so lightning_modules.exposure_bias can
watch the intermediate states.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lightning_modules.base import DiffusionModule
from lightning_modules.schedules import DiscreteSchedule, extract, make_betas
from difflab.errors import ConfigError

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# callback(i, t, x_t): step counter, the (B,) levels x_t is about to be denoised at, the state itself
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]
PREDICTIONS = ("eps", "x0", "v")
SAMPLERS = ("ancestral", "ddim", "dpmpp_2m")
EPS_SCALE_SCHEDULES = ("constant", "linear")
DDIM_SPACINGS = ("uniform", "quadratic", "karras")


def _clip_x0(schedule: DiscreteSchedule, x_t, t, eps, clip: bool):
    """x0 implied by eps, optionally clipped to the data range with eps recomputed to match."""
    x0 = schedule.x0_from_eps(x_t, t, eps)
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
        eps = schedule.eps_from_x0(x_t, t, x0)
    return x0, eps


def _full(n: int, value: int, device) -> torch.Tensor:
    return torch.full((n,), value, dtype=torch.long, device=device)


def ddim_step(x0, eps, a_t, a_prev, eta: float, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Song et al. 2021 eq. 12 from level abar = a_t to a_prev (scalars or tensors broadcasting against x0)."""
    sigma = eta * torch.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    x = a_prev.sqrt() * x0 + torch.sqrt((1 - a_prev - sigma**2).clamp(min=0)) * eps
    if noise is not None:
        x = x + sigma * noise
    return x


def scale_eps(eps_fn: EpsFn, eps_scale: float = 1.0, schedule: str = "constant", slope: float = 0.0) -> EpsFn:
    """Epsilon Scaling (Ning et al. 2024): the sampler sees eps / lambda_t.

    constant: lambda_t = eps_scale; linear: lambda_t = eps_scale + slope * t, the paper's kt + b with t the
    0-based level the net sees (so b differs from the paper's 1-based t by one k). With lambda = 1 the
    function itself is returned, so the samples are bitwise those of the unscaled sampler.
    """
    if schedule not in EPS_SCALE_SCHEDULES:
        raise ValueError(f"eps_scale_schedule must be one of {EPS_SCALE_SCHEDULES}, got {schedule!r}")
    if eps_scale == 1.0 and (schedule == "constant" or slope == 0.0):
        return eps_fn
    if schedule == "constant":
        return lambda x, t: eps_fn(x, t) / eps_scale

    def scaled(x, t):
        lam = eps_scale + slope * t.to(x.dtype)
        return eps_fn(x, t) / lam.view(-1, *([1] * (x.dim() - 1)))

    return scaled


def shift_levels(
    x: torch.Tensor, nominal: int, schedule: DiscreteSchedule, window: int, lowest: int, data_var: torch.Tensor
) -> torch.Tensor:
    """Time-step shifting (Li et al. 2024): per sample, the level near `nominal` whose forward variance fits x.

    Candidates are the levels within +-window of `nominal`, kept in [lowest, T-1]. Each sample's variance over
    its own elements is matched to abar * data_var + (1 - abar), the element variance of q(x_t) for data whose
    samples have element variance data_var. The authors' code matches to 1 - abar alone (data_var = 0); the data
    term is our reading, so that shifting still means something at low noise. Needs many elements per sample
    (images), where the element variance concentrates; on 2-D toy data it is mostly noise.
    """
    hi = min(nominal + window, schedule.num_timesteps - 1)
    candidates = torch.arange(max(nominal - window, lowest), hi + 1, device=x.device)
    abar = schedule.alphas_cumprod[candidates].to(x.dtype)
    target = abar[None] * data_var.to(x.dtype).view(-1, 1) + (1 - abar[None])  # (B or 1, C)
    var = _element_var(x)
    return candidates[(var[:, None] - target).abs().argmin(dim=1)]


def _element_var(x: torch.Tensor) -> torch.Tensor:
    if x[0].numel() < 2:
        raise ValueError("time_shift_window > 0 matches each sample's variance over its elements: it needs samples with 2+ elements")
    return x.flatten(1).var(dim=1)


class _Trajectory:
    """Collects (t, x_t) at every visited step for return_trajectory, and forwards to the user's callback."""

    def __init__(self, callback: StepCallback | None, keep: bool):
        self.callback, self.keep, self.t, self.x = callback, keep, [], []

    def __call__(self, i: int, t: torch.Tensor, x: torch.Tensor) -> None:
        if self.keep:
            self.t.append(t)
            self.x.append(x)
        if self.callback is not None:
            self.callback(i, t, x)

    def result(self, x: torch.Tensor, return_trajectory: bool):
        if not return_trajectory:
            return x
        return x, {"t": torch.stack(self.t), "x": torch.stack(self.x)}


def skip_posterior(schedule: DiscreteSchedule, x0, x_s, s: torch.Tensor, p: int, variance: str = "posterior"):
    """Mean and variance of the step from x_s down to level p < s (p = -1: the data), per row of s.

    q(x_p | x_s, x0) (Kingma et al. 2021, eq. 21 with alpha_{s|p} = abar_s / abar_p): the mean and, for
    'posterior', its variance beta_{s|p} (1 - abar_p) / (1 - abar_s); 'beta' takes beta_{s|p} = 1 - alpha_{s|p},
    Ho et al.'s larger choice. With s = p + 1 these are q_posterior's mean and beta~ / beta.
    """
    abar = schedule.alphas_cumprod
    a_s = extract(abar, s, x_s)
    a_p = abar[p].to(x_s.dtype) if p >= 0 else x_s.new_tensor(1.0)
    beta_sp = 1 - a_s / a_p
    mean = a_p.sqrt() * beta_sp / (1 - a_s) * x0 + (a_s / a_p).sqrt() * (1 - a_p) / (1 - a_s) * x_s
    var = beta_sp if variance == "beta" else beta_sp * (1 - a_p) / (1 - a_s)
    return mean, var


class _TimeShift:
    """Per-sample levels for the next step: the nominal one, or Li et al.'s shifted one when a window is set."""

    def __init__(self, schedule, window: int, cutoff: int, data_var: float | None):
        if window < 0:
            raise ValueError(f"time_shift_window must be >= 0, got {window}")
        self.schedule, self.window, self.cutoff = schedule, window, cutoff
        self.data_var = None if data_var is None else torch.as_tensor(float(data_var))

    def levels(self, k: int, x: torch.Tensor, nominal: int, lowest: int) -> torch.Tensor:
        # x_T is drawn at the top level by construction: nothing to correct before the first step
        if self.window == 0 or k == 0 or nominal <= self.cutoff:
            return _full(x.shape[0], nominal, x.device)
        return shift_levels(x, nominal, self.schedule, self.window, lowest, self.data_var.to(x.device))

    def observe_first_x0(self, x0: torch.Tensor) -> None:
        if self.window > 0 and self.data_var is None:
            self.data_var = _element_var(x0)


@torch.no_grad()
def ancestral_sample(
    eps_fn: EpsFn,
    schedule: DiscreteSchedule,
    x_T: torch.Tensor,
    variance: str = "beta",
    clip_denoised: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
    callback: StepCallback | None = None,
    return_trajectory: bool = False,
    time_shift_window: int = 0,
    time_shift_cutoff: int = 0,
    time_shift_data_var: float | None = None,
):
    """Ho et al. Algorithm 2 over all T steps; sigma_t^2 = beta_t ('beta') or beta~_t ('posterior').

    callback(i, t, x_t) sees every state before it is denoised; return_trajectory=True returns
    (x_0, {"t": (T, B), "x": (T, B, ...)}) instead of x_0. With time_shift_window > 0 (Li et al. 2024,
    see shift_levels) each step denoises x at its shifted level s and steps to the nominal next level
    t-1 with q(x_{t-1} | x_s, x0) (variance beta_{s|t-1} or its posterior counterpart); since s must stay
    above t-1, with stride 1 only upward shifts are possible. time_shift_data_var=None estimates the data's
    element variance once, per sample, from the first step's x0 prediction (our reading, see shift_levels).
    """
    log_var = ancestral_log_variance(schedule, variance)
    watch = _Trajectory(callback, return_trajectory)
    shift = _TimeShift(schedule, time_shift_window, time_shift_cutoff, time_shift_data_var)
    x = x_T
    levels = tqdm(reversed(range(schedule.num_timesteps)), total=schedule.num_timesteps, disable=not progress, desc="ancestral")
    for k, i in enumerate(levels):
        t = shift.levels(k, x, i, lowest=i)
        watch(k, t, x)
        x0, _ = _clip_x0(schedule, x, t, eps_fn(x, t), clip_denoised)
        if k == 0:
            shift.observe_first_x0(x0)
        if time_shift_window == 0:
            mean, _ = schedule.q_posterior(x0, x, t)
            if i > 0:
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = mean + torch.exp(0.5 * extract(log_var, t, x)) * noise
            else:
                x = mean
            continue
        mean, var = skip_posterior(schedule, x0, x, t, i - 1, variance)
        if i > 0:
            x = mean + var.sqrt() * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        else:
            x = mean
    return watch.result(x, return_trajectory)


def ancestral_log_variance(schedule: DiscreteSchedule, variance: str) -> torch.Tensor:
    """log sigma_t^2 of an ancestral step, per level: beta_t ('beta') or the posterior's beta~_t ('posterior')."""
    if variance not in ("beta", "posterior"):
        raise ValueError(f"variance must be 'beta' or 'posterior', got {variance!r}")
    return torch.log(schedule.betas) if variance == "beta" else schedule.posterior_log_variance_clipped


def ddim_timesteps(num_timesteps: int, steps: int, spacing: str = "uniform", schedule: DiscreteSchedule | None = None,
                   rho: float = 7.0) -> torch.Tensor:
    """The levels DDIM visits, from T-1 (pure noise, Lin et al. 2024's 'trailing') down to 0, strictly decreasing.

    uniform:   evenly spaced in t.
    quadratic: t_k = (T-1) (1 - k/(steps-1))^2, so the steps bunch up near the data (Song et al. 2021 used it for
               CIFAR-10): at 10 steps on the linear T=1000 schedule the uniform grid's last step goes from
               noise std 0.36 (level 111) straight to the data, the quadratic one's from 0.05 (level 12).
    karras:    evenly spaced in sigma^(1/rho) between sigma_(T-1) and sigma_0, sigma_t = sqrt((1 - abar_t) / abar_t)
               (Karras et al. 2022's grid, rho = 7), each rounded to the nearest level in log sigma; needs `schedule`.
    Rounding can make neighbours equal; they are pushed apart by one level, so every grid has `steps` levels.
    """
    if not 1 <= steps <= num_timesteps:
        raise ConfigError(f"steps must be in [1, {num_timesteps}] (model.num_timesteps), got {steps}")
    if spacing not in DDIM_SPACINGS:
        raise ValueError(f"ddim_spacing must be one of {DDIM_SPACINGS}, got {spacing!r}")
    top = num_timesteps - 1
    frac = torch.linspace(1.0, 0.0, steps, dtype=torch.float64)
    if spacing == "uniform":
        return (frac * top).round().long()
    if spacing == "quadratic":
        levels = (frac**2 * top).round().long()
    else:
        if schedule is None:
            raise ConfigError("ddim_spacing='karras' places the steps by the schedule's sigmas: pass the schedule")
        log_sigma = schedule.log_sigmas()
        lo, hi = log_sigma[0].exp() ** (1 / rho), log_sigma[top].exp() ** (1 / rho)
        wanted = (rho * torch.log(lo + frac * (hi - lo))).unsqueeze(1)  # log of the grid's sigmas
        levels = (log_sigma.unsqueeze(0) - wanted).abs().argmin(1)
    out = levels.tolist()
    for k in range(steps - 2, -1, -1):  # push equal neighbours apart, from the data end up
        out[k] = max(out[k], out[k + 1] + 1)
    return torch.tensor([min(t, top - k) for k, t in enumerate(out)], dtype=torch.long)


@torch.no_grad()
def ddim_sample(
    eps_fn: EpsFn,
    schedule: DiscreteSchedule,
    x_T: torch.Tensor,
    steps: int = 50,
    eta: float = 0.0,
    clip_denoised: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
    callback: StepCallback | None = None,
    return_trajectory: bool = False,
    time_shift_window: int = 0,
    time_shift_cutoff: int = 0,
    time_shift_data_var: float | None = None,
    spacing: str = "uniform",
):
    """Song et al. 2021 eq. 12; eta=0 is the deterministic DDIM, eta=1 matches DDPM's posterior variance.

    `spacing` picks the levels visited (ddim_timesteps: uniform, quadratic, karras).

    callback / return_trajectory as in ancestral_sample (trajectory of `steps` states). With
    time_shift_window > 0 each step denoises x at its shifted level s (Li et al. 2024's TS-DDIM, see
    shift_levels), searched within +-window of the nominal level but above the next nominal level, and the
    DDIM update goes from abar_s to the nominal next level.
    """
    timesteps = ddim_timesteps(schedule.num_timesteps, steps, spacing, schedule).tolist()
    abar = schedule.alphas_cumprod
    watch = _Trajectory(callback, return_trajectory)
    shift = _TimeShift(schedule, time_shift_window, time_shift_cutoff, time_shift_data_var)
    x = x_T
    for k, i in enumerate(tqdm(timesteps, disable=not progress, desc=f"ddim-{steps}")):
        last = k + 1 == len(timesteps)
        t = shift.levels(k, x, i, lowest=0 if last else timesteps[k + 1] + 1)
        watch(k, t, x)
        x0, eps = _clip_x0(schedule, x, t, eps_fn(x, t), clip_denoised)
        if k == 0:
            shift.observe_first_x0(x0)
        a_t = abar[i] if time_shift_window == 0 else extract(abar, t, x)
        a_prev = abar[timesteps[k + 1]] if not last else abar.new_tensor(1.0)
        noise = None
        if eta > 0 and not last:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = ddim_step(x0, eps, a_t, a_prev, eta, noise)
    return watch.result(x, return_trajectory)


class DDPM(DiffusionModule):
    """Denoising diffusion with a discrete schedule; the net sees the step index as its noise level."""

    sampler_options = {
        "ancestral": ("eps_scale", "time_shift_window"),  # all model.num_timesteps levels: no steps
        "ddim": ("steps", "eta", "ddim_spacing", "eps_scale", "time_shift_window"),
        "dpmpp_2m": ("steps", "ddim_spacing", "eps_scale"),
    }
    quick_sampling = {"sampler": "ddim", "steps": 2}

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
        variance: str = "beta",
        sampler: str = "ddim",
        sample_steps: int = 50,
        eta: float = 0.0,
        input_perturbation: float = 0.0,
        eps_scale: float = 1.0,
        eps_scale_schedule: str = "constant",
        eps_scale_slope: float = 0.0,
        time_shift_window: int = 0,
        time_shift_cutoff: int = 0,
        time_shift_data_var: float | None = None,
        ddim_spacing: str = "uniform",
    ):
        super().__init__(net, optimizer, scheduler, data_shape, cond_dim, clip_denoised)
        if prediction not in PREDICTIONS:
            raise ConfigError(f"model.prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if sampler not in SAMPLERS:
            raise ConfigError(f"model.sampler must be one of {SAMPLERS}, got {sampler!r}")
        if not 1 <= sample_steps <= num_timesteps:
            raise ConfigError(f"model.sample_steps={sample_steps} must be in [1, model.num_timesteps={num_timesteps}]")
        self.schedule = DiscreteSchedule(make_betas(schedule, num_timesteps, beta_start, beta_end))
        self.prediction = prediction
        self.variance = variance
        self.sampler = sampler
        self.sample_steps = sample_steps
        self.eta = eta
        if input_perturbation < 0:
            raise ConfigError(f"model.input_perturbation must be >= 0, got {input_perturbation}")
        if eps_scale_schedule not in EPS_SCALE_SCHEDULES:
            raise ConfigError(f"model.eps_scale_schedule must be one of {EPS_SCALE_SCHEDULES}, got {eps_scale_schedule!r}")
        if min(eps_scale, eps_scale + eps_scale_slope * (num_timesteps - 1) * (eps_scale_schedule == "linear")) <= 0:
            raise ConfigError("model.eps_scale (and eps_scale + eps_scale_slope * t over all t) must stay > 0: it divides eps")
        if time_shift_window < 0 or time_shift_cutoff < 0:
            raise ConfigError("model.time_shift_window and model.time_shift_cutoff must be >= 0")
        self.input_perturbation = float(input_perturbation)
        self.eps_scale = float(eps_scale)
        self.eps_scale_schedule = eps_scale_schedule
        self.eps_scale_slope = float(eps_scale_slope)
        self.time_shift_window = int(time_shift_window)
        self.time_shift_cutoff = int(time_shift_cutoff)
        self.time_shift_data_var = time_shift_data_var
        if ddim_spacing not in DDIM_SPACINGS:
            raise ConfigError(f"model.ddim_spacing must be one of {DDIM_SPACINGS}, got {ddim_spacing!r}")
        self.ddim_spacing = ddim_spacing

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
        x_t = self.schedule.q_sample(x0, t, self.perturb(noise, generator))
        return F.mse_loss(self.net(x_t, t.float(), cond), self.target(x0, t, noise))

    def nfe(self, sampler: str | None = None, steps: int | None = None) -> int:
        sampler = sampler or self.sampler
        return self.num_timesteps if sampler == "ancestral" else (steps or self.sample_steps)

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        cond=None,
        sampler: str | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        eta: float | None = None,
        x_T: torch.Tensor | None = None,
        progress: bool = False,
        eps_scale: float | None = None,
        time_shift_window: int | None = None,
        callback: StepCallback | None = None,
        ddim_spacing: str | None = None,
    ) -> torch.Tensor:
        """eps_scale / time_shift_window / ddim_spacing override the module's settings for this call (None: the module's)."""
        cond = self.check_cond(cond, num_samples)
        sampler = sampler or self.sampler
        x_T = self.prior_noise(num_samples, generator) if x_T is None else x_T
        eps_fn = self.sampling_eps_fn(cond, eps_scale)
        shift = {
            "time_shift_window": self.time_shift_window if time_shift_window is None else int(time_shift_window),
            "time_shift_cutoff": self.time_shift_cutoff,
            "time_shift_data_var": self.time_shift_data_var,
        }
        if sampler == "ancestral":
            return ancestral_sample(
                eps_fn, self.schedule, x_T, self.variance, self.clip_denoised, generator, progress, callback=callback, **shift
            )
        if sampler == "ddim":
            eta = self.eta if eta is None else eta
            return ddim_sample(
                eps_fn, self.schedule, x_T, steps or self.sample_steps, eta, self.clip_denoised, generator, progress,
                callback=callback, spacing=ddim_spacing or self.ddim_spacing, **shift,
            )
        if sampler == "dpmpp_2m":
            from lightning_modules.dpm_solver import dpm_solver_2m_sample  # it builds on this file's helpers

            if shift["time_shift_window"]:
                raise ConfigError("time_shift_window applies to the ancestral and ddim samplers, not dpmpp_2m: set it to 0")
            return dpm_solver_2m_sample(
                eps_fn, self.schedule, x_T, steps or self.sample_steps, self.clip_denoised, progress, callback=callback,
                spacing=ddim_spacing or self.ddim_spacing,
            )
        raise ConfigError(f"unknown sampler {sampler!r} for DDPM: use one of {SAMPLERS}")

    def sampling_eps_fn(self, cond=None, eps_scale: float | None = None) -> EpsFn:
        """The eps the samplers use: the net's, divided by the Epsilon Scaling lambda_t when one is set."""
        eps_fn = lambda x, t: self.eps(x, t, cond)  # noqa: E731
        scale = self.eps_scale if eps_scale is None else float(eps_scale)
        return scale_eps(eps_fn, scale, self.eps_scale_schedule, self.eps_scale_slope)
