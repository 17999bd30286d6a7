"""Flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023) on the shared core, on any affine path.

x_t = alpha(t) x0 + sigma(t) n, t in [0, 1] (`model.path`, lightning_modules/paths.py: `linear` is rectified flow's
x_t = (1 - t) x0 + t n, `cosine` the variance-preserving alpha = cos(pi t / 2), sigma = sin(pi t / 2)); the net
regresses the path's velocity d_alpha x0 + d_sigma n (the conditional flow, whose least-squares fit is the marginal
velocity field), with t drawn logit-normal (Esser et al. 2024) or uniform. In the VE form x_t / alpha = x0 +
(sigma / alpha) n; for the linear path

    sigma_VE = t / (1 - t),   t = sigma_VE / (1 + sigma_VE),   D(x; sigma_VE) = x_t - t v(x_t, t),  x_t = x / (1 + sigma_VE),

and every sampler of the registry runs on it; Euler on its uniform t grid is rectified flow's own sampler
(Euler in VE form on any grid is Euler in t). The grid starts at t_max < 1, where the state is taken to be pure
noise, x_{t_max} = n: an alpha(t_max) share of x0 is dropped there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from difflab.errors import ConfigError
from lightning_modules.base import DiffusionModule
from lightning_modules.paths import make_path
from samplers import grids
from samplers.core import batch_sigma

TIME_SAMPLINGS = ("logit_normal", "uniform")


class FlowMatching(DiffusionModule):
    """Conditional flow matching on an affine path (rectified flow's line by default); the net sees 999 t as its noise
    level."""

    quick_sampling = {"sampler": "euler", "steps": 2}
    default_sampling = {"sampler": "euler", "steps": 20, "options": {}}

    def __init__(
        self,
        net,
        optimizer,
        scheduler=None,
        data_shape=(),
        cond_dim=None,
        clip_denoised: bool = False,
        path: str = "linear",
        time_sampling: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        t_min: float = 1e-5,
        t_max: float = 0.999,
        sampling: dict | None = None,
    ):
        super().__init__(net, optimizer, scheduler, data_shape, cond_dim, clip_denoised, sampling)
        if time_sampling not in TIME_SAMPLINGS:
            raise ConfigError(f"model.time_sampling must be one of {TIME_SAMPLINGS}, got {time_sampling!r}")
        if not 0 < t_min < t_max < 1:
            raise ConfigError(f"need 0 < model.t_min < model.t_max < 1, got {t_min}, {t_max}")
        if logit_std <= 0:
            raise ConfigError(f"model.logit_std must be positive, got {logit_std}")
        self.path = make_path(path)
        self.time_sampling = time_sampling
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.check_default_sampler()

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        return self.net(x_t, 999.0 * t, cond)

    def draw_t(self, n: int, device, generator=None) -> torch.Tensor:
        if self.time_sampling == "uniform":
            return torch.rand(n, device=device, generator=generator)
        return torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, device=device, generator=generator))

    def loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """E || v(x_t, t) - (d_alpha x0 + d_sigma n) ||^2 (n - x0 on the line), mean over elements."""
        x0, cond = batch["x"], batch.get("cond")
        t = self.draw_t(x0.shape[0], x0.device, generator).to(x0.dtype)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = self.path.perturb(x0, t, noise)
        return F.mse_loss(self.velocity(x_t, t, cond), self.path.velocity_target(x0, t, noise))

    # --- the VE-form denoiser ------------------------------------------------------------------
    @property
    def sigma_range(self) -> tuple[float, float]:
        ends = self.path.ve_sigma(torch.tensor([self.t_min, self.t_max], dtype=torch.float64))
        return float(ends[0]), float(ends[1])

    def denoise(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        sigma = batch_sigma(sigma, x)
        t = self.path.t_of_ve_sigma(sigma)
        x_t = self.path.from_ve(x, sigma)
        return self.path.x0_from_velocity(x_t, t, self.velocity(x_t, t, cond).to(x.dtype))

    def grid(self, sampler: str, steps: int, options: dict | None = None) -> torch.Tensor:
        """Evenly spaced t from t_max down to 0 (sigma = 0: the last step returns D), rectified flow's own grid."""
        return grids.time_uniform(self.path.ve_sigma, steps, self.t_max, 0.0)
