"""Noise paths as objects: x_t = alpha(t) x0 + sigma(t) n, and everything a method reads from its path.

A path gives alpha(t) and sigma(t) (`marginal`), their time derivatives (`d_marginal`, for velocity targets), the
VE form x_t / alpha = x0 + (sigma / alpha) n and its inverse in t (`ve_sigma`, `t_of_ve_sigma`), the training draw
x_t (`perturb`), and in VE terms the scale between the two coordinates (`mean_scale`, `to_ve`, `from_ve`) and the
prior's std (`prior_ve_std`). The base's hooks (`to_ve`, `prior_std`, `likelihood_bounds`) read `module.path`, so a
method on a path writes none of them, and a new interpolant is one class here and one config: `model.path=cosine`
on flow matching is `CosinePath` and nothing else. The score SDEs (`lightning_modules/sde.py`) are paths too, DDPM
runs on `DiscreteVPPath` over its table, and the VE methods on the base's default `VEPath`.

Times t are (B,) tensors; VE levels given as Python floats come back as floats (float64 arithmetic).
"""

from __future__ import annotations

import math

import torch

from difflab.errors import ConfigError


def bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) in x's dtype, to scale a batch of x."""
    return v.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


class AffinePath:
    """x_t = alpha(t) x0 + sigma(t) n on t in [0, T]; subclasses give the marginal, its derivative and t(sigma_VE)."""

    T = 1.0

    def marginal(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma), each shaped like t."""
        raise NotImplementedError

    def d_marginal(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(d alpha / dt, d sigma / dt): what a velocity regresses onto, d_alpha x0 + d_sigma n."""
        raise NotImplementedError

    def t_of_ve_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prior_std(self) -> float:
        """The std of the path's own prior at t = T (1 for VP-like paths and flows)."""
        return 1.0

    # --- derived ------------------------------------------------------------------------------------
    def ve_sigma(self, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.marginal(t)
        return sigma / alpha

    def perturb(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.marginal(t)
        return bcast(alpha, x0) * x0 + bcast(sigma, x0) * noise

    def velocity_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        d_alpha, d_sigma = self.d_marginal(t)
        return bcast(d_alpha, x0) * x0 + bcast(d_sigma, x0) * noise

    def x0_from_velocity(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x0 from x_t = alpha x0 + sigma n and v = d_alpha x0 + d_sigma n (two equations, two unknowns)."""
        alpha, sigma = self.marginal(t)
        d_alpha, d_sigma = self.d_marginal(t)
        return (bcast(d_sigma, x_t) * x_t - bcast(sigma, x_t) * v) / bcast(d_sigma * alpha - sigma * d_alpha, x_t)

    def mean_scale(self, sigma: float) -> float:
        """alpha at the VE level sigma: x_own = mean_scale * x_VE."""
        t = self.t_of_ve_sigma(torch.tensor(sigma, dtype=torch.float64))
        return float(self.marginal(t)[0])

    def to_ve(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """x in the path's coordinates at the VE level sigma (a float, or per sample (B,)), in the VE form."""
        if torch.is_tensor(sigma) and sigma.ndim == 1:
            alpha, _ = self.marginal(self.t_of_ve_sigma(sigma.double()))
            return x / bcast(alpha, x)
        return x / self.mean_scale(sigma)

    def from_ve(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """A batch of VE-form states at per-sample levels (B,) in the path's own coordinates."""
        alpha, _ = self.marginal(self.t_of_ve_sigma(sigma.double()))
        return x * bcast(alpha, x)

    def prior_ve_std(self, sigma: float) -> float:
        return self.prior_std() / self.mean_scale(sigma)


class LinearPath(AffinePath):
    """Rectified flow's straight line, alpha = 1 - t, sigma = t: sigma_VE = t / (1 - t), t = sigma_VE / (1 + sigma_VE).
    The VE conversions are written in closed form (1 + sigma), exact where the generic ones round."""

    def marginal(self, t):
        return 1 - t, t

    def d_marginal(self, t):
        return -torch.ones_like(t), torch.ones_like(t)

    def t_of_ve_sigma(self, sigma):
        return sigma / (1 + sigma)

    def velocity_target(self, x0, t, noise):
        return noise - x0

    def x0_from_velocity(self, x_t, t, v):
        return x_t - bcast(t, x_t) * v

    def mean_scale(self, sigma: float) -> float:
        return 1 / (1 + sigma)

    def to_ve(self, x, sigma):
        return x * (bcast(1 + sigma, x) if torch.is_tensor(sigma) and sigma.ndim == 1 else 1 + sigma)

    def from_ve(self, x, sigma):
        return x / bcast(1 + sigma, x)

    def prior_ve_std(self, sigma: float) -> float:
        return 1 + sigma  # x_{t_max} = n is n / (1 - t_max) in the VE form


class CosinePath(AffinePath):
    """The trigonometric interpolant alpha = cos(pi t / 2), sigma = sin(pi t / 2) (variance preserving; Albergo &
    Vanden-Eijnden 2023's and the v-prediction papers' path): sigma_VE = tan(pi t / 2)."""

    def marginal(self, t):
        return torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)

    def d_marginal(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t), 0.5 * math.pi * torch.cos(0.5 * math.pi * t)

    def t_of_ve_sigma(self, sigma):
        return torch.atan(sigma) * (2 / math.pi)


class VEPath(AffinePath):
    """The variance-exploding path, alpha = 1, sigma = t: its own coordinates are the VE form (NCSN, EDM, the
    consistency models; the base's default). t is sigma itself, on [0, inf)."""

    T = math.inf

    def marginal(self, t):
        return torch.ones_like(t), t

    def d_marginal(self, t):
        return torch.zeros_like(t), torch.ones_like(t)

    def t_of_ve_sigma(self, sigma):
        return sigma

    def mean_scale(self, sigma: float) -> float:
        return 1.0

    def to_ve(self, x, sigma):
        return x

    def from_ve(self, x, sigma):
        return x

    def prior_ve_std(self, sigma: float) -> float:
        return sigma  # the VE prior at the top level is N(0, sigma_max^2)


class DiscreteVPPath(AffinePath):
    """DDPM's variance-preserving path on its trained table: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) n, so
    sigma_VE^2 = (1 - abar) / abar and alpha = 1 / sqrt(1 + sigma_VE^2) at any level (written in closed form). Its
    time is the (fractional) step index, read from the table by the method (`DDPM.level_of`)."""

    def __init__(self, schedule):
        self.schedule = schedule

    def mean_scale(self, sigma: float) -> float:
        return (1 + sigma**2) ** -0.5

    def to_ve(self, x, sigma):
        if torch.is_tensor(sigma) and sigma.ndim == 1:
            return x * bcast(torch.sqrt(1 + sigma.double() ** 2), x)
        return x * (1 + sigma**2) ** 0.5

    def from_ve(self, x, sigma):
        return x * bcast(torch.rsqrt(1 + sigma.double() ** 2), x)

    def prior_ve_std(self, sigma: float) -> float:
        return (1 + sigma**2) ** 0.5  # x_T ~ N(0, I) in VP coordinates is x_T / sqrt(abar_T)

    def perturb(self, x0, t, noise):
        return self.schedule.q_sample(x0, t, noise)


VE_PATH = VEPath()
PATHS = {"linear": LinearPath, "cosine": CosinePath}


def make_path(name: str) -> AffinePath:
    if name not in PATHS:
        raise ConfigError(f"model.path={name!r} is not a path: use one of {', '.join(PATHS)} (lightning_modules/paths.py)")
    return PATHS[name]()
