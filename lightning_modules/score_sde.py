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

Samplers (model.sampler): 'pc' (predictor + Langevin corrector), 'euler_maruyama'
(reverse SDE), 'ode' (probability-flow ODE, fixed Euler/Heun steps), 'ode_adaptive'
(RK45 to rtol/atol; its NFE is only known after the solve: `nfe()` reports the last one).
"""

from __future__ import annotations

import torch

from lightning_modules.base import DiffusionModule
from lightning_modules.sde import bcast, make_sde
from lightning_modules.sde_samplers import (
    euler_maruyama,
    ode_nfe,
    predictor_corrector,
    probability_flow_ode,
    probability_flow_ode_adaptive,
)
from lightning_modules.sde_samplers import bits_per_dim as _bits_per_dim
from difflab.errors import ConfigError

SAMPLERS = ("pc", "euler_maruyama", "ode", "ode_adaptive")


class ScoreSDE(DiffusionModule):
    sampler_options = {"pc": ("steps",), "euler_maruyama": ("steps",), "ode": ("steps",), "ode_adaptive": ()}
    quick_sampling = {"sampler": "ode", "steps": 2}

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
        sampler: str = "pc",
        sample_steps: int = 1000,
        predictor: str = "reverse_diffusion",
        corrector: str = "langevin",
        snr: float = 0.16,
        n_corrector_steps: int = 1,
        ode_solver: str = "heun",
        denoise: bool = True,
        rtol: float = 1e-5,
        atol: float = 1e-5,
    ):
        super().__init__(net, optimizer, scheduler, data_shape, cond_dim, clip_denoised)
        if sampler not in SAMPLERS:
            raise ConfigError(f"model.sampler must be one of {SAMPLERS}, got {sampler!r}")
        if not 0 < eps < 1 or not 0 < sample_eps < 1:
            raise ConfigError(f"model.eps and model.sample_eps must lie in (0, 1), got {eps}, {sample_eps}")
        self.sde_name = sde
        self.sde = make_sde(sde, sigma_min=sigma_min, sigma_max=sigma_max, beta_min=beta_min, beta_max=beta_max)
        self.eps = eps
        self.sample_eps = sample_eps
        self.likelihood_weighting = likelihood_weighting
        self.sampler = sampler
        self.sample_steps = sample_steps
        self.predictor = predictor
        self.corrector = corrector
        self.snr = snr
        self.n_corrector_steps = n_corrector_steps
        self.ode_solver = ode_solver
        self.denoise = denoise
        self.rtol = rtol
        self.atol = atol
        self.last_nfe = 0  # of the last adaptive ODE solve

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
        t = self.eps + (self.sde.T - self.eps) * u
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

    def nfe(self, sampler: str | None = None, steps: int | None = None) -> int:
        sampler = sampler or self.sampler
        steps = steps or self.sample_steps
        if sampler == "pc":
            corrector_steps = self.n_corrector_steps if self.corrector == "langevin" else 0
            return steps * (1 + corrector_steps) + int(self.denoise)
        if sampler == "euler_maruyama":
            return steps + int(self.denoise)
        if sampler == "ode":
            return ode_nfe(steps, self.ode_solver, self.denoise)
        return self.last_nfe

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        cond=None,
        sampler: str | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        x_T: torch.Tensor | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        cond = self.check_cond(cond, num_samples)
        sampler = sampler or self.sampler
        steps = steps or self.sample_steps
        if x_T is None:
            x_T = self.sde.prior_std() * self.prior_noise(num_samples, generator)
        score_fn = lambda x, t: self.score(x, t, cond)  # noqa: E731
        common = dict(eps=self.sample_eps, denoise=self.denoise)
        if sampler == "pc":
            x = predictor_corrector(
                score_fn, self.sde, x_T, steps, self.predictor, self.corrector, self.snr, self.n_corrector_steps,
                generator=generator, progress=progress, **common,
            )
        elif sampler == "euler_maruyama":
            x = euler_maruyama(score_fn, self.sde, x_T, steps, generator=generator, progress=progress, **common)
        elif sampler == "ode":
            x = probability_flow_ode(score_fn, self.sde, x_T, steps, self.ode_solver, progress=progress, **common)
        elif sampler == "ode_adaptive":
            x, self.last_nfe = probability_flow_ode_adaptive(score_fn, self.sde, x_T, self.rtol, self.atol, **common)
        else:
            raise ConfigError(f"unknown sampler {sampler!r} for ScoreSDE: use one of {SAMPLERS}")
        return x.clamp(-1.0, 1.0) if self.clip_denoised else x

    def bits_per_dim(self, x: torch.Tensor, cond=None, num_levels: int | None = 256, probe: str = "rademacher", generator=None):
        """Bits/dim of a batch through the probability-flow ODE (see sde_samplers.bits_per_dim); returns (bpd, NFE)."""
        return _bits_per_dim(self, x, cond, num_levels, probe, self.rtol, self.atol, generator=generator)
