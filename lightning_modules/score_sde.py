"""Score-based generative modelling through SDEs (Song et al. 2021): one module for VE, VP and sub-VP.

Training is continuous-time denoising score matching (eq. 7): t ~ U(eps, 1),
x_t ~ q(x_t | x_0), weighted by lambda(t) = std(t)^2 or, with
likelihood_weighting, by g(t)^2 (Song et al. 2021b), which makes the loss an
upper bound on the negative log-likelihood.

Parametrization ("scale by sigma"): s(x, t) = -net(x, c(t)) / std(t), so the net
predicts the unit noise and the std^2-weighted loss is 1/2 ||net - z||^2. The
net's noise level c(t) follows the paper's nets:
- VP / sub-VP: c = 999 t, as DDPM++ feeds its sinusoidal embedding (DDPM's step scale);
- VE: c = log sigma(t), as NCSN++ feeds its Fourier embedding (use net.embedding_scale
  to sharpen the sinusoidal embedding of this narrower range on large nets).

Sampling is the base's, in the VE form x / mean_scale = x0 + (std / mean_scale) n (sub-VP included): the
native grid is sigma(t) on t = 1 -> sample_eps evenly spaced, then (model.denoise) a last Tweedie step to 0.
model.sampler 'pc' (reverse-SDE predictor + Langevin corrector), 'euler_maruyama', 'ode' (Heun or Euler by
model.ode_solver) and 'ode_adaptive' (RK45) are the registry's samplers; every other one runs too.
"""

from __future__ import annotations

import torch

from difflab.errors import ConfigError
from lightning_modules.base import DiffusionModule
from lightning_modules.sde import bcast, make_sde
from samplers import grids
from samplers.core import batch_sigma

ODE_SOLVERS = ("heun", "euler")
# In the VE form the reverse-diffusion predictor (the reverse of the SDE's own discretization) and Euler-Maruyama
# are one step, x + (sigma^2 - sigma_next^2) score + sqrt(sigma^2 - sigma_next^2) z; both names are kept for configs.
PREDICTORS = ("reverse_diffusion", "euler_maruyama")
CORRECTORS = ("langevin", "none")


class ScoreSDE(DiffusionModule):
    fixed_grid = ("ode_adaptive",)
    quick_sampling = {"sampler": "ode", "steps": 2}
    # rtol / atol: ode_adaptive's, and the likelihood's (bits_per_dim)
    default_sampling = {"sampler": "pc", "steps": 1000, "options": {"snr": 0.16, "n_corrector_steps": 1, "rtol": 1e-5, "atol": 1e-5}}

    def __init__(
        self,
        net,
        optimizer,
        scheduler=None,
        data_shape=(),
        cond_dim=None,
        clip_denoised: bool = False,
        sde: str = "vp",
        sigma_min: float = 0.01,
        sigma_max: float = 50.0,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        eps: float = 1e-5,
        sample_eps: float = 1e-3,
        likelihood_weighting: bool = False,
        predictor: str = "reverse_diffusion",
        corrector: str = "langevin",
        ode_solver: str = "heun",
        denoise: bool = True,
        sampling: dict | None = None,
    ):
        super().__init__(net, optimizer, scheduler, data_shape, cond_dim, clip_denoised, sampling)
        if predictor not in PREDICTORS:
            raise ConfigError(f"model.predictor must be one of {PREDICTORS}, got {predictor!r}")
        if corrector not in CORRECTORS:
            raise ConfigError(f"model.corrector must be one of {CORRECTORS}, got {corrector!r}")
        if ode_solver not in ODE_SOLVERS:
            raise ConfigError(f"model.ode_solver must be one of {ODE_SOLVERS}, got {ode_solver!r}")
        if not 0 < eps < 1 or not 0 < sample_eps < 1:
            raise ConfigError(f"model.eps and model.sample_eps must lie in (0, 1), got {eps}, {sample_eps}")
        self.sde_name = sde
        self.sde = make_sde(sde, sigma_min=sigma_min, sigma_max=sigma_max, beta_min=beta_min, beta_max=beta_max)
        self.t_min = eps  # the config's `eps`: the smallest training time
        self.sample_eps = sample_eps
        self.likelihood_weighting = likelihood_weighting
        self.predictor = predictor
        self.corrector = corrector
        self.ode_solver = ode_solver
        self.final_denoise = denoise  # the config's `denoise`: a last Tweedie step from sample_eps to 0
        self.check_default_sampler()

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        if self.sde_name == "ve":
            return self.sde.sigma(t).log()
        return 999.0 * t

    def score(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        _, std = self.sde.marginal(t)
        return -self.net(x, self.noise_level(t), cond) / bcast(std, x)

    def loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        x0, cond = batch["x"], batch.get("cond")
        u = torch.rand(x0.shape[0], device=x0.device, generator=generator)
        t = self.t_min + (self.sde.T - self.t_min) * u
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = self.sde.perturb(x0, t, noise)
        _, std = self.sde.marginal(t)
        score = self.score(x_t, t, cond)
        if self.likelihood_weighting:
            # lambda = g^2 (Song et al. 2021b, Theorem 1): 1/2 g^2 ||s + z / std||^2
            per_sample = 0.5 * self.sde.diffusion(t) ** 2 * ((score + noise / bcast(std, x0)) ** 2).flatten(1).sum(1)
        else:
            per_sample = 0.5 * ((bcast(std, x0) * score + noise) ** 2).flatten(1).sum(1)
        # Per dimension, so the loss reads the same on 2-D points and images (Adam does not see the constant).
        return per_sample.mean() / x0[0].numel()

    # --- the VE-form denoiser ------------------------------------------------------------------
    def _ve_sigma(self, t: float) -> float:
        return float(self.sde.ve_sigma(torch.tensor(t, dtype=torch.float64)))

    @property
    def sigma_range(self) -> tuple[float, float]:
        return self._ve_sigma(self.t_min), self._ve_sigma(self.sde.T)

    def denoise(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        """D = x_VE + sigma^2 score_VE = x_VE - sigma net(mean_scale x_VE, c(t)), t = t(sigma) (score = -net / std)."""
        sigma = batch_sigma(sigma, x)
        t = self.sde.t_of_ve_sigma(sigma.double())
        mean_scale, _ = self.sde.marginal(t)
        out = self.net(x * bcast(mean_scale, x), self.noise_level(t.to(x.dtype)), cond).to(x.dtype)
        return x - bcast(sigma, x) * out

    @property
    def path(self):
        """The SDE is the noise path: the base's to_ve, prior_std and likelihood_bounds read it."""
        return self.sde

    def resolve_sampler(self, sampler: str | None) -> str:
        sampler = sampler or self.sampler
        return self.ode_solver if sampler == "ode" else sampler

    def grid(self, sampler: str, steps: int, options: dict | None = None) -> torch.Tensor:
        sigmas = grids.time_uniform(self.sde.ve_sigma, steps, self.sde.T, self.sample_eps)
        if sampler == "ode_adaptive":
            sigmas = sigmas[[0, -1]]
        return grids.append_zero(sigmas) if self.final_denoise else sigmas

    def sampling_defaults(self, sampler: str) -> dict:
        defaults = super().sampling_defaults(sampler)
        if self.corrector == "none" and "n_corrector_steps" in defaults:
            defaults["n_corrector_steps"] = 0
        return defaults
