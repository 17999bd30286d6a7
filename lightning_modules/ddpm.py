"""DDPM (Ho et al. 2020) with ancestral sampling and DDIM (Song et al. 2021).

The samplers are plain functions of an eps-model `eps_fn(x_t, t) -> eps`, so
tests can run them on an analytic eps and other methods (scheduled sampling)
can reuse them unchanged.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lightning_modules.base import DiffusionModule
from lightning_modules.schedules import DiscreteSchedule, extract, make_betas

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PREDICTIONS = ("eps", "x0", "v")
SAMPLERS = ("ancestral", "ddim")


def _clip_x0(schedule: DiscreteSchedule, x_t, t, eps, clip: bool):
    """x0 implied by eps, optionally clipped to the data range with eps recomputed to match."""
    x0 = schedule.x0_from_eps(x_t, t, eps)
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
        eps = schedule.eps_from_x0(x_t, t, x0)
    return x0, eps


def _full(n: int, value: int, device) -> torch.Tensor:
    return torch.full((n,), value, dtype=torch.long, device=device)


@torch.no_grad()
def ancestral_sample(
    eps_fn: EpsFn,
    schedule: DiscreteSchedule,
    x_T: torch.Tensor,
    variance: str = "beta",
    clip_denoised: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Ho et al. Algorithm 2 over all T steps; sigma_t^2 = beta_t ('beta') or beta~_t ('posterior')."""
    if variance not in ("beta", "posterior"):
        raise ValueError(f"variance must be 'beta' or 'posterior', got {variance!r}")
    log_var = torch.log(schedule.betas) if variance == "beta" else schedule.posterior_log_variance_clipped
    x = x_T
    for i in tqdm(reversed(range(schedule.num_timesteps)), total=schedule.num_timesteps, disable=not progress, desc="ancestral"):
        t = _full(x.shape[0], i, x.device)
        x0, _ = _clip_x0(schedule, x, t, eps_fn(x, t), clip_denoised)
        mean, _ = schedule.q_posterior(x0, x, t)
        if i > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = mean + torch.exp(0.5 * extract(log_var, t, x)) * noise
        else:
            x = mean
    return x


def ddim_timesteps(num_timesteps: int, steps: int) -> torch.Tensor:
    """Evenly spaced from T-1 down to 0, so the first step starts from pure noise (Lin et al. 2024's 'trailing')."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    return torch.linspace(num_timesteps - 1, 0, steps, dtype=torch.float64).round().long()


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
) -> torch.Tensor:
    """Song et al. 2021 eq. 12; eta=0 is the deterministic DDIM, eta=1 matches DDPM's posterior variance."""
    timesteps = ddim_timesteps(schedule.num_timesteps, steps).tolist()
    abar = schedule.alphas_cumprod
    x = x_T
    for k, i in enumerate(tqdm(timesteps, disable=not progress, desc=f"ddim-{steps}")):
        t = _full(x.shape[0], i, x.device)
        x0, eps = _clip_x0(schedule, x, t, eps_fn(x, t), clip_denoised)
        a_t = abar[i]
        a_prev = abar[timesteps[k + 1]] if k + 1 < len(timesteps) else abar.new_tensor(1.0)
        sigma = eta * torch.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x = a_prev.sqrt() * x0 + torch.sqrt((1 - a_prev - sigma**2).clamp(min=0)) * eps
        if eta > 0 and k + 1 < len(timesteps):
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x


class DDPM(DiffusionModule):
    """Denoising diffusion with a discrete schedule; the net sees the step index as its noise level."""

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
    ):
        super().__init__(net, optimizer, scheduler, data_shape, cond_dim, clip_denoised)
        if prediction not in PREDICTIONS:
            raise ValueError(f"model.prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"model.sampler must be one of {SAMPLERS}, got {sampler!r}")
        self.schedule = DiscreteSchedule(make_betas(schedule, num_timesteps, beta_start, beta_end))
        self.prediction = prediction
        self.variance = variance
        self.sampler = sampler
        self.sample_steps = sample_steps
        self.eta = eta

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

    def loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """L_simple (Ho et al. eq. 14): uniform t, unweighted MSE on the prediction target."""
        x0, cond = batch["x"], batch.get("cond")
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = self.schedule.q_sample(x0, t, noise)
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
    ) -> torch.Tensor:
        cond = self.check_cond(cond, num_samples)
        sampler = sampler or self.sampler
        x_T = self.prior_noise(num_samples, generator) if x_T is None else x_T
        eps_fn = lambda x, t: self.eps(x, t, cond)  # noqa: E731
        if sampler == "ancestral":
            return ancestral_sample(eps_fn, self.schedule, x_T, self.variance, self.clip_denoised, generator, progress)
        if sampler == "ddim":
            eta = self.eta if eta is None else eta
            return ddim_sample(eps_fn, self.schedule, x_T, steps or self.sample_steps, eta, self.clip_denoised, generator, progress)
        raise ValueError(f"unknown sampler {sampler!r} for DDPM: use one of {SAMPLERS}")
