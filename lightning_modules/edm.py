"""EDM: Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models".

The forward process is x + sigma * n (VE, no scaling), sampled by the
probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma with Heun's method on
the schedule of eq. 5 (Algorithm 1; Algorithm 2 when s_churn > 0).

Preconditioning (Table 1): D(x; sigma) = c_skip x + c_out F(c_in x, c_noise).
c_in makes the net's input unit-variance at every sigma; c_skip and c_out make
its training target (x - c_skip y) / c_out unit-variance too, and the loss
weight lambda = 1 / c_out^2 cancels c_out, so every noise level contributes a
unit-scale regression. `EDMPrecond.coefficients` is the only place the four
functions live, so a subclass can swap them (the consistency model's boundary
condition) and reuse everything else.

The samplers are plain functions of a denoiser `denoise_fn(x, sigma) -> E[x_0 | x]`,
so tests run them on a Gaussian mixture's exact denoiser.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from lightning_modules.base import DiffusionModule
from difflab.errors import ConfigError

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SAMPLERS = ("heun", "euler")


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """Eq. 5: n noise levels from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho) (float64).

    rho = 7 spends most steps at small sigma, where the ODE's curvature (and the
    error a step makes) is largest; rho = 1 is evenly spaced in sigma.
    """
    if n < 1:
        raise ValueError(f"need at least one noise level, got n={n}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if n == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    # Pin the ends: the power round trip is off by an ulp, and callers compare sigmas[0] to sigma_max.
    sigmas[0], sigmas[-1] = sigma_max, sigma_min
    return sigmas


def _as_batch_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or have shape ({x.shape[0]},), got {tuple(sigma.shape)}")
    return sigma


class EDMPrecond(nn.Module):
    """D(x; sigma) = c_skip x + c_out net(c_in x, c_noise, cond) around any net(x, noise_level, cond) of this project."""

    def __init__(self, net: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in, c_noise), each shaped like sigma (Karras et al. Table 1, "Ours")."""
        sd2 = self.sigma_data**2
        total = sigma**2 + sd2
        c_skip = sd2 / total
        c_out = sigma * self.sigma_data / total.sqrt()
        c_in = total.rsqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(self, x: torch.Tensor, sigma, cond: torch.Tensor | None = None) -> torch.Tensor:
        sigma = _as_batch_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        shape = (-1, *([1] * (x.dim() - 1)))
        out = self.net(c_in.reshape(shape) * x, c_noise, cond)
        # The net may run under bf16 autocast; the skip connection keeps x's precision.
        return c_skip.reshape(shape) * x + c_out.reshape(shape) * out.to(x.dtype)


# --- samplers --------------------------------------------------------------------------------------


def _with_final_zero(sigmas: torch.Tensor) -> list[float]:
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    if sigmas.numel() < 1 or (sigmas <= 0).any() or (sigmas[1:] >= sigmas[:-1]).any():
        raise ValueError("sigmas must be positive and strictly decreasing (the sampler appends sigma = 0)")
    return sigmas.tolist() + [0.0]


def heun_step(denoise_fn: DenoiseFn, x: torch.Tensor, sigma_from: torch.Tensor, sigma_to: torch.Tensor) -> torch.Tensor:
    """One Heun step of dx/dsigma = (x - D(x; sigma)) / sigma with per-sample sigmas (B,), both > 0."""
    shape = (-1, *([1] * (x.dim() - 1)))
    s0, s1 = sigma_from.reshape(shape).to(x.dtype), sigma_to.reshape(shape).to(x.dtype)
    d0 = (x - denoise_fn(x, sigma_from)) / s0
    x_euler = x + (s1 - s0) * d0
    d1 = (x_euler - denoise_fn(x_euler, sigma_to)) / s1
    return x + (s1 - s0) * 0.5 * (d0 + d1)



@torch.no_grad()
def edm_heun_sample(
    denoise_fn: DenoiseFn,
    x_T: torch.Tensor,
    sigmas: torch.Tensor,
    generator: torch.Generator | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    progress: bool = False,
) -> torch.Tensor:
    """Karras et al. Algorithm 2 (Algorithm 1 when s_churn = 0): 2n - 1 denoiser calls for n sigmas.

    x_T must already be sigma_max-scaled noise. With s_churn > 0 each step in
    [s_tmin, s_tmax] first raises the noise level by a factor 1 + gamma with fresh
    noise (a Langevin-like correction of earlier errors), then takes the ODE step.
    """
    levels = _with_final_zero(sigmas)
    n = len(levels) - 1
    gamma_max = min(s_churn / n, math.sqrt(2) - 1)  # beyond sqrt(2) - 1 the churn adds more noise than is present
    x = x_T
    for i in tqdm(range(n), disable=not progress, desc=f"edm-heun-{n}"):
        sigma, sigma_next = levels[i], levels[i + 1]
        gamma = gamma_max if s_churn > 0 and s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * noise
        if sigma_next > 0:
            x = heun_step(denoise_fn, x, x.new_full((x.shape[0],), sigma_hat), x.new_full((x.shape[0],), sigma_next))
        else:
            # Euler on the last step: at sigma = 0 the trapezoid's second slope (x - D) / sigma is undefined.
            x = denoise_fn(x, x.new_full((x.shape[0],), sigma_hat))
    return x


@torch.no_grad()
def edm_euler_sample(denoise_fn: DenoiseFn, x_T: torch.Tensor, sigmas: torch.Tensor, progress: bool = False) -> torch.Tensor:
    """First-order steps of the same ODE: one denoiser call per sigma (the last step lands on D(x; sigma_min))."""
    levels = _with_final_zero(sigmas)
    x = x_T
    for sigma, sigma_next in tqdm(list(zip(levels[:-1], levels[1:])), disable=not progress, desc=f"edm-euler-{len(levels) - 1}"):
        d = (x - denoise_fn(x, x.new_full((x.shape[0],), sigma))) / sigma
        x = x + (sigma_next - sigma) * d
    return x


def edm_nfe(sampler: str, steps: int) -> int:
    if sampler == "heun":
        return 2 * steps - 1
    if sampler == "euler":
        return steps
    raise ConfigError(f"unknown sampler {sampler!r} for EDM: use one of {SAMPLERS}")


# --- the method ------------------------------------------------------------------------------------


class EDM(DiffusionModule):
    """EDM training (log-normal sigma, lambda = 1 / c_out^2) and Heun / Euler sampling of the ODE."""

    sampler_options = {"heun": ("steps",), "euler": ("steps",)}
    quick_sampling = {"sampler": "euler", "steps": 2}

    def __init__(
        self,
        net,
        optimizer,
        scheduler=None,
        data_shape=(),
        cond_dim=None,
        clip_denoised: bool = False,
        sigma_data: float = 0.5,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        sampler: str = "heun",
        sample_steps: int = 18,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = math.inf,
        s_noise: float = 1.0,
    ):
        super().__init__(net, optimizer, scheduler, data_shape, cond_dim, clip_denoised)
        if sampler not in SAMPLERS:
            raise ConfigError(f"model.sampler must be one of {SAMPLERS}, got {sampler!r}")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < model.sigma_min < model.sigma_max, got {sigma_min}, {sigma_max}")
        if sigma_data <= 0 or p_std <= 0:
            raise ConfigError(f"model.sigma_data and model.p_std must be positive, got {sigma_data}, {p_std}")
        self.sigma_data = float(sigma_data)
        self.p_mean = float(p_mean)
        self.p_std = float(p_std)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.rho = float(rho)
        self.sampler = sampler
        self.sample_steps = int(sample_steps)
        self.s_churn = float(s_churn)
        self.s_tmin = float(s_tmin)
        self.s_tmax = float(s_tmax)
        self.s_noise = float(s_noise)

    def make_precond(self, net: nn.Module) -> EDMPrecond:
        """The wrapper around `net`; a subclass returns its own (other coefficients, extra settings)."""
        return EDMPrecond(net, self.sigma_data)

    @property
    def precond(self) -> EDMPrecond:
        # Kept out of the module tree on purpose: registered, it would store every weight twice in the
        # state_dict (net.* and precond.net.*), while checkpoints, EMA and train.py (n_params, compile,
        # channels_last) all expect the raw net at `self.net`. The wrapper has no state of its own, so
        # rebuilding it if `net` is replaced (or after a deepcopy, which copies the cache consistently) is free.
        cached = self.__dict__.get("_precond")
        if cached is None or cached.net is not self.net:
            cached = self.make_precond(self.net)
            self.__dict__["_precond"] = cached
        return cached

    def denoise(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        """D(x; sigma) ~ E[x_0 | x_0 + sigma n = x]; sigma a scalar or (B,)."""
        return self.precond(x, sigma, cond)

    def loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """Eq. 2 with ln sigma ~ N(p_mean, p_std^2) and lambda = (sigma^2 + sd^2) / (sigma sd)^2 (Table 1)."""
        x0, cond = batch["x"], batch.get("cond")
        shape = (-1, *([1] * (x0.dim() - 1)))
        log_sigma = torch.randn(x0.shape[0], device=x0.device, dtype=x0.dtype, generator=generator)
        sigma = (self.p_mean + self.p_std * log_sigma).exp()
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        denoised = self.denoise(x0 + sigma.reshape(shape) * noise, sigma, cond)
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        # Mean over elements rather than the paper's sum, so the figure reads the same for 2-D points and images;
        # a net that outputs 0 on data of std sigma_data starts at ~1.
        return (weight.reshape(shape) * (denoised - x0) ** 2).mean()

    def sigmas(self, steps: int | None = None) -> torch.Tensor:
        """The sampling schedule (float64, on the CPU: the samplers read it as Python floats)."""
        return karras_sigmas(steps or self.sample_steps, self.sigma_min, self.sigma_max, self.rho)

    def nfe(self, sampler: str | None = None, steps: int | None = None) -> int:
        return edm_nfe(sampler or self.sampler, steps or self.sample_steps)

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        cond=None,
        sampler: str | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        x_T: torch.Tensor | None = None,
        s_churn: float | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        cond = self.check_cond(cond, num_samples)
        sampler = sampler or self.sampler
        steps = steps or self.sample_steps
        if sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {sampler!r} for EDM: use one of {SAMPLERS}")
        if x_T is None:
            x_T = self.sigma_max * self.prior_noise(num_samples, generator)
        denoise_fn = lambda x, sigma: self.denoise(x, sigma, cond)  # noqa: E731
        sigmas = self.sigmas(steps)
        if sampler == "heun":
            churn = self.s_churn if s_churn is None else s_churn
            x = edm_heun_sample(denoise_fn, x_T, sigmas, generator, churn, self.s_tmin, self.s_tmax, self.s_noise, progress)
        else:
            x = edm_euler_sample(denoise_fn, x_T, sigmas, progress)
        return x.clamp(-1.0, 1.0) if self.clip_denoised else x
