"""NCSN (Song & Ermon 2019) and NCSNv2 (Song & Ermon 2020): noise-conditional score networks.

Geometric noise levels sigma_1 > ... > sigma_L; the score at each level is trained
with one of three objectives (model.objective):
- dsm (default): denoising score matching weighted by lambda(sigma) = sigma^2;
- ism: implicit (Hyvarinen) score matching with the exact Jacobian trace (<= 64 dims);
- ssm: sliced score matching, variance-reduced.
ism and ssm train on the same noise levels as dsm: a level i is drawn uniformly,
the data are perturbed to x~ = x + sigma_i z (samples of p_sigma_i), the objective
is applied to s(., sigma_i) at x~ (so it learns grad log p_sigma_i, as dsm does) and
weighted by sigma_i^2. With num_scales=1 that is single-scale training at sigma_min.

Parametrizations (model.parametrization):
- v2 (NCSNv2, Technique 3): s(x, sigma) = net(x, log sigma) / sigma, the net sees noise_level = log sigma;
- v1 (NCSN): s(x, sigma_i) = net(x, i), the net sees the level index i as its noise level.

Sampling (model.sampler): annealed Langevin dynamics with the final denoising step,
or plain single-scale Langevin with the score at sigma_min. Both start from
N(0, sigma_1^2 I), the perturbed data distribution at sigma_1 when sigma_1 is
as large as NCSNv2's Technique 1 asks (`sigma_max_from_data`); the papers start
from uniform noise, which matches their sigma_1 = 1 on [0, 1] images.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_modules.base import DiffusionModule
from lightning_modules.langevin import annealed_langevin, annealed_langevin_nfe, geometric_sigmas, langevin, sigma_max_from_data
from lightning_modules.score_objectives import OBJECTIVES, dsm, input_gradients, ism, ssm
from difflab.errors import ConfigError

PARAMETRIZATIONS = ("v2", "v1")
SAMPLERS = ("annealed_langevin", "langevin")


class NCSN(DiffusionModule):
    sampler_options = {"annealed_langevin": ("steps",), "langevin": ("steps",)}
    quick_sampling = {"sampler": "annealed_langevin", "steps": 1}

    def __init__(
        self,
        net,
        optimizer,
        scheduler=None,
        data_shape=(),
        cond_dim=None,
        clip_denoised: bool = False,
        sigma_max: float = 1.0,
        sigma_min: float = 0.01,
        num_scales: int = 10,
        objective: str = "dsm",
        parametrization: str = "v2",
        ssm_projections: int = 1,
        sampler: str = "annealed_langevin",
        n_steps_each: int = 100,
        step_lr: float = 2e-5,
        denoise: bool = True,
        langevin_step_size: float = 5e-5,
    ):
        super().__init__(net, optimizer, scheduler, data_shape, cond_dim, clip_denoised)
        if objective not in OBJECTIVES:
            raise ConfigError(f"model.objective must be one of {OBJECTIVES}, got {objective!r}")
        if parametrization not in PARAMETRIZATIONS:
            raise ConfigError(f"model.parametrization must be one of {PARAMETRIZATIONS}, got {parametrization!r}")
        if sampler not in SAMPLERS:
            raise ConfigError(f"model.sampler must be one of {SAMPLERS}, got {sampler!r}")
        # Derived from the config, never saved: a checkpoint rebuilds them from its run config.
        self.register_buffer("sigmas", geometric_sigmas(sigma_max, sigma_min, num_scales).float(), persistent=False)
        self.sigma_max, self.sigma_min, self.num_scales = float(sigma_max), float(sigma_min), int(num_scales)
        self.objective = objective
        self.parametrization = parametrization
        self.ssm_projections = ssm_projections
        self.sampler = sampler
        self.n_steps_each = n_steps_each
        self.step_lr = step_lr
        self.denoise = denoise
        self.langevin_step_size = langevin_step_size

    @property
    def sample_steps(self) -> int:
        return self.n_steps_each

    def score(self, x: torch.Tensor, idx: torch.Tensor, cond=None) -> torch.Tensor:
        """s(x, sigma_idx) for a (B,) long tensor of level indices (0 = largest sigma)."""
        if self.parametrization == "v1":
            return self.net(x, idx.float(), cond)
        sigma = self.sigmas[idx]
        return self.net(x, sigma.log(), cond) / sigma.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))

    def loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        x, cond = batch["x"], batch.get("cond")
        idx = torch.randint(0, self.num_scales, (x.shape[0],), device=x.device, generator=generator)
        sigma = self.sigmas[idx]
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        if self.objective == "dsm":
            per_sample = dsm(lambda y, _: self.score(y, idx, cond), x, sigma, noise)
        else:
            with input_gradients():
                # Copies: inference-mode tensors (validation) cannot be saved for the backward pass these need.
                x_noisy = (x + sigma.reshape(-1, *([1] * (x.dim() - 1))) * noise).clone()
                cond_ = cond.clone() if cond is not None else None
                score_fn = lambda y: self.score(y, idx, cond_)  # noqa: E731
                if self.objective == "ism":
                    per_sample = ism(score_fn, x_noisy)
                else:
                    per_sample = ssm(score_fn, x_noisy, self.ssm_projections, generator=generator)
                per_sample = sigma**2 * per_sample
        # Per dimension, so the loss reads the same on 2-D points and images (Adam does not see the constant).
        return per_sample.mean() / x[0].numel()

    def on_train_batch_start(self, batch, batch_idx) -> None:
        if self.global_step == 0 and batch_idx == 0 and self.num_scales > 1:
            spread = sigma_max_from_data(batch["x"])
            if self.sigma_max < spread:
                rank_zero_warn(
                    f"model.sigma_max={self.sigma_max:g} is below the largest pairwise distance in a training batch "
                    f"({spread:.3g}): NCSNv2 (Technique 1) sets sigma_max at least that large so Langevin at the first "
                    "level can move between modes"
                )

    def nfe(self, sampler: str | None = None, steps: int | None = None) -> int:
        sampler = sampler or self.sampler
        if sampler == "langevin":
            return steps or self.num_scales * self.n_steps_each
        return annealed_langevin_nfe(self.num_scales, steps or self.n_steps_each, self.denoise)

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        cond=None,
        sampler: str | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        x_init: torch.Tensor | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """`steps`: Langevin steps per noise level (annealed_langevin) or in all (langevin)."""
        cond = self.check_cond(cond, num_samples)
        sampler = sampler or self.sampler
        x = self.sigma_max * self.prior_noise(num_samples, generator) if x_init is None else x_init
        if sampler == "annealed_langevin":
            score_fn = lambda y, idx: self.score(y, idx, cond)  # noqa: E731
            x = annealed_langevin(score_fn, self.sigmas, x, steps or self.n_steps_each, self.step_lr, self.denoise, generator, progress)
        elif sampler == "langevin":
            last = torch.full((num_samples,), self.num_scales - 1, dtype=torch.long, device=x.device)
            n_steps = steps or self.num_scales * self.n_steps_each
            x = langevin(lambda y: self.score(y, last, cond), x, n_steps, self.langevin_step_size, generator, progress)
        else:
            raise ConfigError(f"unknown sampler {sampler!r} for NCSN: use one of {SAMPLERS}")
        return x.clamp(-1.0, 1.0) if self.clip_denoised else x
