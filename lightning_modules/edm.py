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

Sampling is the base's: every registry sampler runs on `denoise` (heun is Algorithm 1/2, euler its first-order
sibling), on Karras' rho-spaced grid between sigma_max and sigma_min with a last step to 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from difflab.errors import ConfigError
from lightning_modules.base import DiffusionModule
from samplers import grids
from samplers.core import batch_sigma


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
        sigma = batch_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        shape = (-1, *([1] * (x.dim() - 1)))
        out = self.net(c_in.reshape(shape) * x, c_noise, cond)
        # The net may run under bf16 autocast; the skip connection keeps x's precision.
        return c_skip.reshape(shape) * x + c_out.reshape(shape) * out.to(x.dtype)


# --- the method ------------------------------------------------------------------------------------


class EDM(DiffusionModule):
    """EDM training (log-normal sigma, lambda = 1 / c_out^2) and Heun / Euler sampling of the ODE."""

    quick_sampling = {"sampler": "euler", "steps": 2}
    default_sampling = {"sampler": "heun", "steps": 18, "options": {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}}

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
        sampling: dict | None = None,
    ):
        super().__init__(net, optimizer, scheduler, data_shape, cond_dim, clip_denoised, sampling)
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
        self.check_default_sampler()

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

    @property
    def sigma_range(self) -> tuple[float, float]:
        return self.sigma_min, self.sigma_max

    def grid(self, sampler: str, steps: int, options: dict | None = None) -> torch.Tensor:
        """Eq. 5's schedule (float64, on the CPU: the samplers read it as Python floats) and a last step to 0."""
        return grids.append_zero(grids.karras(steps, self.sigma_min, self.sigma_max, self.rho))
