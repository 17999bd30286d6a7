"""Discrete-time noise schedules shared by every DDPM-family method.

Everything is computed in float64 from the betas and stored as float32 buffers
that are derived from the config, never saved in checkpoints.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al. 2020: betas spaced linearly; the paper's 1e-4..0.02 assume T=1000."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_alpha_bar(t: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17 (unnormalised): f(t) = cos^2((t + s) / (1 + s) * pi / 2), t in [0, 1]."""
    return torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021: beta_t = 1 - abar(t+1)/abar(t), clipped at 0.999 to avoid a singular end."""
    t = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alpha_bar = cosine_alpha_bar(t, s)
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def make_betas(schedule: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    if schedule == "linear":
        return linear_betas(num_timesteps, beta_start, beta_end)
    if schedule in ("cosine", "squaredcos_cap_v2"):
        return cosine_betas(num_timesteps)
    raise ValueError(f"unknown noise schedule {schedule!r}: use 'linear' or 'cosine'")


def extract(a: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """a[t] reshaped to broadcast against x (B, ...)."""
    return a[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


class DiscreteSchedule(nn.Module):
    """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) and the posterior q(x_{t-1} | x_t, x_0).

    Index t runs 0..T-1, where t=0 is the first noising step (the paper's t=1).
    """

    def __init__(self, betas: torch.Tensor):
        super().__init__()
        betas = betas.to(torch.float64)
        if not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas must lie in (0, 1)")
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        # Ho et al. eq. 7: posterior variance beta~_t and the two coefficients of its mean.
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        buffers = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "posterior_variance": posterior_variance,
            # beta~_0 is 0: clip the log at beta~_1 as Ho et al.'s code does.
            "posterior_log_variance_clipped": torch.log(
                torch.cat([posterior_variance[1:2], posterior_variance[1:]])
            ),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def log_sigmas(self) -> torch.Tensor:
        """log sigma_t, sigma_t = sqrt((1 - abar_t) / abar_t): the VE noise level of each step, float64 on the CPU
        (step grids and solver coefficients are host-side arithmetic). -log sigma_t is half the log-SNR."""
        # From the two square-root buffers q_sample uses (float32 copies of float64 values): 1 - abar from the
        # float32 abar buffer would lose most of its digits at small t.
        up = self.sqrt_one_minus_alphas_cumprod.detach().double().cpu()
        down = self.sqrt_alphas_cumprod.detach().double().cpu()
        return torch.log(up) - torch.log(down)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return extract(self.sqrt_alphas_cumprod, t, x0) * x0 + extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x_0)."""
        mean = extract(self.posterior_mean_coef1, t, x_t) * x0 + extract(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, extract(self.posterior_variance, t, x_t)

    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (x_t - extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * eps) / extract(self.sqrt_alphas_cumprod, t, x_t)

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return (x_t - extract(self.sqrt_alphas_cumprod, t, x_t) * x0) / extract(self.sqrt_one_minus_alphas_cumprod, t, x_t)

    def v_target(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Salimans & Ho 2022: v = sqrt(abar) eps - sqrt(1 - abar) x0."""
        return extract(self.sqrt_alphas_cumprod, t, x0) * eps - extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0

    def eps_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return extract(self.sqrt_alphas_cumprod, t, x_t) * v + extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t

    def sigmas(self) -> torch.Tensor:
        """sigma_t = sqrt((1 - abar_t) / abar_t) of every level, increasing in t (float64, CPU): the VE noise levels."""
        return self.log_sigmas().exp()

    def x0_and_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, clip: bool = False):
        """x0 implied by eps, optionally clipped to the data range with eps recomputed to match."""
        x0 = self.x0_from_eps(x_t, t, eps)
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
            eps = self.eps_from_x0(x_t, t, x0)
        return x0, eps

    def ancestral_log_variance(self, variance: str) -> torch.Tensor:
        """log sigma_t^2 of an ancestral step per level: beta_t ('beta') or the posterior's beta~_t ('posterior')."""
        if variance not in ("beta", "posterior"):
            raise ValueError(f"variance must be 'beta' or 'posterior', got {variance!r}")
        return torch.log(self.betas) if variance == "beta" else self.posterior_log_variance_clipped


def ddim_step(x0, eps, a_t, a_prev, eta: float, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Song et al. 2021 eq. 12 from level abar = a_t to a_prev in VP coordinates (the training-time roll-backs of
    scheduled sampling; samplers use the VE form in samplers.stochastic)."""
    sigma = eta * torch.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    x = a_prev.sqrt() * x0 + torch.sqrt((1 - a_prev - sigma**2).clamp(min=0)) * eps
    if noise is not None:
        x = x + sigma * noise
    return x
