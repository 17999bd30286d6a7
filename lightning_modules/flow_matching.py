"""Flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023) on the shared core.

x_t = (1 - t) x0 + t n, t in [0, 1]; the net regresses the velocity n - x0 of that straight path (the
conditional flow, whose least-squares fit is the marginal velocity field E[n - x0 | x_t]), with t drawn
logit-normal (Esser et al. 2024) or uniform. In the VE form x_t / (1 - t) = x0 + (t / (1 - t)) n, so

    sigma = t / (1 - t),   t = sigma / (1 + sigma),   D(x; sigma) = x_t - t v(x_t, t),  x_t = x / (1 + sigma),

and every sampler of the registry runs on it; Euler on its uniform t grid is rectified flow's own sampler
(Euler in VE form on any grid is Euler in t). The grid starts at t_max < 1 (sigma = t_max / (1 - t_max)),
where the state is taken to be pure noise, x_{t_max} = n: a 1 - t_max fraction of x0 is dropped there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from difflab.errors import ConfigError
from lightning_modules.base import DiffusionModule
from samplers import grids
from samplers.core import batch_sigma, bcast

TIME_SAMPLINGS = ("logit_normal", "uniform")


class FlowMatching(DiffusionModule):
    """Conditional flow matching with the linear (rectified-flow) path; the net sees 999 t as its noise level."""

    quick_sampling = {"sampler": "euler", "steps": 2}

    def __init__(
        self,
        net,
        optimizer,
        scheduler=None,
        data_shape=(),
        cond_dim=None,
        clip_denoised: bool = False,
        time_sampling: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        t_min: float = 1e-5,
        t_max: float = 0.999,
        sampler: str = "euler",
        sample_steps: int = 20,
    ):
        super().__init__(net, optimizer, scheduler, data_shape, cond_dim, clip_denoised)
        if time_sampling not in TIME_SAMPLINGS:
            raise ConfigError(f"model.time_sampling must be one of {TIME_SAMPLINGS}, got {time_sampling!r}")
        if not 0 < t_min < t_max < 1:
            raise ConfigError(f"need 0 < model.t_min < model.t_max < 1, got {t_min}, {t_max}")
        if logit_std <= 0 or sample_steps < 1:
            raise ConfigError(f"model.logit_std and model.sample_steps must be positive, got {logit_std}, {sample_steps}")
        self.time_sampling = time_sampling
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.sampler = sampler
        self.sample_steps = int(sample_steps)
        self.check_default_sampler()

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        return self.net(x_t, 999.0 * t, cond)

    def draw_t(self, n: int, device, generator=None) -> torch.Tensor:
        if self.time_sampling == "uniform":
            return torch.rand(n, device=device, generator=generator)
        return torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, device=device, generator=generator))

    def loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """E || v(x_t, t) - (n - x0) ||^2, mean over elements."""
        x0, cond = batch["x"], batch.get("cond")
        t = self.draw_t(x0.shape[0], x0.device, generator).to(x0.dtype)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = bcast(1 - t, x0) * x0 + bcast(t, x0) * noise
        return F.mse_loss(self.velocity(x_t, t, cond), noise - x0)

    # --- the VE-form denoiser ------------------------------------------------------------------
    @staticmethod
    def sigma_of_t(t: torch.Tensor) -> torch.Tensor:
        return t / (1 - t)

    @property
    def sigma_range(self) -> tuple[float, float]:
        return self.t_min / (1 - self.t_min), self.t_max / (1 - self.t_max)

    def denoise(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        sigma = batch_sigma(sigma, x)
        t = sigma / (1 + sigma)
        x_t = x / bcast(1 + sigma, x)
        return x_t - bcast(t, x) * self.velocity(x_t, t, cond).to(x.dtype)

    def prior_std(self, sigma: float) -> float:
        return 1 + sigma  # x_{t_max} = n is n / (1 - t_max) in the VE form

    def to_ve(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return x * (1 + sigma)

    def grid(self, sampler: str, steps: int, options: dict | None = None) -> torch.Tensor:
        """Evenly spaced t from t_max down to 0 (sigma = 0: the last step returns D), rectified flow's own grid."""
        return grids.time_uniform(self.sigma_of_t, steps, self.t_max, 0.0)

    def likelihood_bounds(self) -> tuple[float, float, float, float]:
        lo, hi = self.sigma_range
        return lo, hi, self.prior_std(hi), 1 - self.t_min
