"""Forward SDEs of Song et al. 2021 (score SDE): VE, VP and sub-VP on t in [0, T=1].

Each SDE dx = f(x, t) dt + g(t) dw gives its drift and diffusion, the Gaussian
marginal q(x_t | x_0) = N(mean_scale(t) x_0, std(t)^2 I), its prior and a
discretization. The reverse-time SDE and the probability-flow ODE are derived
here once, in `SDE`, from f, g and a score; no subclass writes its own.

Times are (B,) tensors; per-sample factors come back shaped (B,) and are
broadcast against x with `bcast`.
"""

from __future__ import annotations

import math

import torch
from difflab.errors import ConfigError
from lightning_modules.paths import AffinePath, bcast

SDE_NAMES = ("ve", "vp", "subvp")
__all__ = ["SDE", "VESDE", "VPSDE", "SubVPSDE", "make_sde", "bcast"]


class SDE(AffinePath):
    """dx = f(x, t) dt + g(t) dw. Subclasses give f, g, the marginal and the prior; the rest is derived. An SDE is a
    noise path (its marginal is alpha = mean_scale, sigma = std), so the VE conversions come from AffinePath."""

    # --- what an SDE provides -----------------------------------------------------------------
    def drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """f(x, t), shaped like x."""
        raise NotImplementedError

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        """g(t), shaped (B,)."""
        raise NotImplementedError

    def marginal(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean_scale, std), each (B,): q(x_t | x_0) = N(mean_scale x_0, std^2 I)."""
        raise NotImplementedError

    def t_of_ve_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """The time with that VE-form noise level (the inverse of ve_sigma)."""
        raise NotImplementedError

    # --- derived ----------------------------------------------------------------------------
    def drift_diffusion(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.drift(x, t), self.diffusion(t)

    def prior_sample(self, shape, generator: torch.Generator | None = None, device=None, dtype=torch.float32) -> torch.Tensor:
        device = device if device is not None else (generator.device if generator is not None else "cpu")
        return self.prior_std() * torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, prior_std^2 I) per sample, (B,)."""
        d = z[0].numel()
        s2 = self.prior_std() ** 2
        return -0.5 * d * math.log(2 * math.pi * s2) - z.flatten(1).pow(2).sum(1) / (2 * s2)

    def discretize(self, x: torch.Tensor, t: torch.Tensor, dt: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward step that ends at t: x_t = x_{t-dt} + f_i + G_i z. Euler-Maruyama unless a subclass knows better."""
        f, g = self.drift_diffusion(x, t)
        return f * dt, g * math.sqrt(dt)

    def reverse_drift(self, x: torch.Tensor, t: torch.Tensor, score: torch.Tensor, probability_flow: bool = False) -> torch.Tensor:
        """Drift of the reverse-time SDE (Song et al. 2021, eq. 6) or of the probability-flow ODE (eq. 13)."""
        f, g = self.drift_diffusion(x, t)
        weight = 0.5 if probability_flow else 1.0
        return f - weight * bcast(g**2, x) * score

    def reverse_diffusion(self, t: torch.Tensor, probability_flow: bool = False) -> torch.Tensor:
        g = self.diffusion(t)
        return torch.zeros_like(g) if probability_flow else g

    def reverse(self, score_fn, probability_flow: bool = False) -> "ReverseSDE":
        return ReverseSDE(self, score_fn, probability_flow)

    def reverse_discretize(self, x: torch.Tensor, t: torch.Tensor, dt: float, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reverse of the discretized forward chain (Song et al. 2021, eq. 46): x_{t-dt} = x_t - f_i + G_i^2 s + G_i z."""
        f_i, G_i = self.discretize(x, t, dt)
        return -f_i + bcast(G_i**2, x) * score, G_i


class ReverseSDE:
    """dx = [f - g^2 s] dt + g dw-bar run from T to 0; with probability_flow, dx/dt = f - g^2 s / 2."""

    def __init__(self, sde: SDE, score_fn, probability_flow: bool = False):
        self.sde = sde
        self.score_fn = score_fn
        self.probability_flow = probability_flow

    def drift_diffusion(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        drift = self.sde.reverse_drift(x, t, self.score_fn(x, t), self.probability_flow)
        return drift, self.sde.reverse_diffusion(t, self.probability_flow)


class VESDE(SDE):
    """Variance exploding (SMLD's continuum): sigma(t) = sigma_min (sigma_max / sigma_min)^t, f = 0.

    The marginal std is sigma(t), the paper's convention: it treats the data at t=0
    as already perturbed by sigma_min (the exact solution from a clean x_0 has
    variance sigma(t)^2 - sigma_min^2, a difference of sigma_min^2 = 1e-4).
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"VE SDE needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.log_ratio = math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min * torch.exp(t * self.log_ratio)

    def drift(self, x, t):
        return torch.zeros_like(x)

    def diffusion(self, t):
        # g = sqrt(d sigma^2 / dt) (Song et al. 2021, eq. 30)
        return self.sigma(t) * math.sqrt(2 * self.log_ratio)

    def marginal(self, t):
        return torch.ones_like(t), self.sigma(t)

    def prior_std(self) -> float:
        return self.sigma_max

    def ve_sigma(self, t):
        return self.sigma(t)

    def t_of_ve_sigma(self, sigma):
        return torch.log(sigma / self.sigma_min) / self.log_ratio

    def discretize(self, x, t, dt):
        # SMLD's chain x_i = x_{i-1} + sqrt(sigma_i^2 - sigma_{i-1}^2) z, with sigma = 0 before t = 0.
        prev = torch.where(t - dt > -1e-9, self.sigma(t - dt), torch.zeros_like(t))
        return torch.zeros_like(x), (self.sigma(t) ** 2 - prev**2).clamp(min=0).sqrt()


class VPSDE(SDE):
    """Variance preserving (DDPM's continuum): beta(t) = beta_min + t (beta_max - beta_min), f = -beta x / 2."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not 0 < beta_min < beta_max:
            raise ValueError(f"VP SDE needs 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integral_beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min * t + 0.5 * t**2 * (self.beta_max - self.beta_min)

    def t_of_integral(self, b: torch.Tensor) -> torch.Tensor:
        """The t with int_0^t beta = b: beta_min t + (beta_max - beta_min) t^2 / 2 = b, solved as
        2b / (beta_min + sqrt(beta_min^2 + 2 slope b)), which does not cancel catastrophically at small b."""
        slope = self.beta_max - self.beta_min
        return 2 * b / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * slope * b))

    def ve_sigma(self, t):
        return torch.expm1(self.integral_beta(t)).sqrt()  # sqrt(1 - e^-B) / e^(-B/2)

    def t_of_ve_sigma(self, sigma):
        return self.t_of_integral(torch.log1p(sigma**2))

    def drift(self, x, t):
        return -0.5 * bcast(self.beta(t), x) * x

    def diffusion(self, t):
        return self.beta(t).sqrt()

    def marginal(self, t):
        # Song et al. 2021, eq. 33: mean exp(-B/2) x_0, variance 1 - exp(-B), B = int_0^t beta
        b = self.integral_beta(t)
        return torch.exp(-0.5 * b), (-torch.expm1(-b)).sqrt()

    def discretize(self, x, t, dt):
        # DDPM's chain x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z with beta_i = beta(t) dt; dt = 1/N at
        # t_i = i/(N-1) gives Ho et al.'s linear betas beta_min/N .. beta_max/N exactly.
        beta_i = self.beta(t) * dt
        return (bcast((1 - beta_i).sqrt(), x) - 1) * x, beta_i.sqrt()


class SubVPSDE(VPSDE):
    """sub-VP: VP's drift, g(t)^2 = beta(t) (1 - exp(-2 int beta)); its variance stays below VP's."""

    def diffusion(self, t):
        return (self.beta(t) * -torch.expm1(-2 * self.integral_beta(t))).sqrt()

    def marginal(self, t):
        # Song et al. 2021, eq. 34-35: same mean as VP, std 1 - exp(-B) instead of sqrt(1 - exp(-B))
        b = self.integral_beta(t)
        return torch.exp(-0.5 * b), -torch.expm1(-b)

    def ve_sigma(self, t):
        return 2 * torch.sinh(0.5 * self.integral_beta(t))  # (1 - e^-B) / e^(-B/2)

    def t_of_ve_sigma(self, sigma):
        return self.t_of_integral(2 * torch.asinh(0.5 * sigma))

    def discretize(self, x, t, dt):
        # No discrete chain precedes sub-VP, so not DDPM's: plain Euler-Maruyama.
        return SDE.discretize(self, x, t, dt)


def make_sde(name: str, sigma_min: float = 0.01, sigma_max: float = 50.0, beta_min: float = 0.1, beta_max: float = 20.0) -> SDE:
    """The SDE named by `model.sde`, with the parameters it uses (the others are ignored)."""
    if name == "ve":
        return VESDE(sigma_min, sigma_max)
    if name == "vp":
        return VPSDE(beta_min, beta_max)
    if name == "subvp":
        return SubVPSDE(beta_min, beta_max)
    raise ConfigError(f"model.sde must be one of {SDE_NAMES}, got {name!r}")
