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

import math

import torch
from lightning.pytorch.utilities import rank_zero_warn

from difflab.errors import ConfigError
from lightning_modules.base import DiffusionModule
from lightning_modules.score_objectives import OBJECTIVES, dsm, input_gradients, ism, ssm
from samplers import grids
from samplers.core import batch_sigma, bcast

PARAMETRIZATIONS = ("v2", "v1")
LANGEVIN = ("annealed_langevin", "langevin")


def sigma_max_from_data(x: torch.Tensor, max_points: int = 4096) -> float:
    """Largest pairwise Euclidean distance in the data (NCSNv2, Technique 1: sigma_1 of that size lets
    Langevin at the first level move between any two training points).

    Exact over at most `max_points` rows (the first ones; pass a shuffled set), in float64.
    """
    x = x.reshape(x.shape[0], -1)[:max_points].double()
    if x.shape[0] < 2:
        raise ValueError("sigma_max_from_data needs at least two data points")
    return torch.cdist(x, x).max().item()


class NCSN(DiffusionModule):
    single_level_langevin = True
    quick_sampling = {"sampler": "annealed_langevin", "steps": 1}
    # steps: Langevin steps per level (annealed_langevin, its n_steps_each) or in all (langevin: n_steps); the grid's
    # steps for the denoiser samplers. step_lr: eps of alpha_i = eps sigma_i^2 / sigma_L^2; step_size: plain Langevin's.
    default_sampling = {"sampler": "annealed_langevin", "steps": 100, "options": {"step_lr": 2e-5, "step_size": 5e-5}}
    legacy_sampling = {**DiffusionModule.legacy_sampling, "n_steps_each": "steps", "langevin_step_size": "step_size"}  # flat model.* keys of old configs

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
        denoise: bool = True,
        sampling: dict | None = None,
    ):
        super().__init__(net, optimizer, scheduler, data_shape, cond_dim, clip_denoised, sampling)
        if objective not in OBJECTIVES:
            raise ConfigError(f"model.objective must be one of {OBJECTIVES}, got {objective!r}")
        if parametrization not in PARAMETRIZATIONS:
            raise ConfigError(f"model.parametrization must be one of {PARAMETRIZATIONS}, got {parametrization!r}")
        # Derived from the config, never saved: a checkpoint rebuilds them from its run config.
        self.register_buffer("sigmas", grids.geometric(sigma_max, sigma_min, num_scales).float(), persistent=False)
        self.sigma_max, self.sigma_min, self.num_scales = float(sigma_max), float(sigma_min), int(num_scales)
        self.objective = objective
        self.parametrization = parametrization
        self.ssm_projections = ssm_projections
        self.final_denoise = denoise  # the config's `denoise`: NCSNv2's last Tweedie step
        self.check_default_sampler()

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

    # --- the VE-form denoiser ------------------------------------------------------------------
    @property
    def sigma_range(self) -> tuple[float, float]:
        return self.sigma_min, self.sigma_max

    def denoise(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        """D = x + sigma^2 s(x, sigma) (Tweedie). v2 feeds log sigma, so any sigma works; v1 feeds the level index,
        interpolated linearly in log sigma between the trained levels."""
        sigma = batch_sigma(sigma, x)
        if self.parametrization == "v2":
            return x + bcast(sigma, x) * self.net(x, sigma.log(), cond).to(x.dtype)
        if self.num_scales == 1:
            idx = torch.zeros_like(sigma)
        else:
            idx = (self.num_scales - 1) * (math.log(self.sigma_max) - sigma.log()) / math.log(self.sigma_max / self.sigma_min)
        return x + bcast(sigma**2, x) * self.net(x, idx, cond).to(x.dtype)

    def grid(self, sampler: str, steps: int, options: dict | None = None) -> torch.Tensor:
        """The trained levels for Langevin (its steps are per level); Karras' grid over them for the others."""
        if sampler in LANGEVIN:
            sigmas = self.sigmas.double().cpu()
            return grids.append_zero(sigmas) if self.final_denoise and sampler == "annealed_langevin" else sigmas
        return super().grid(sampler, steps, options)

    def sampling_defaults(self, sampler: str) -> dict:
        """Langevin's step counts from the block's steps (per level), unless the block's options set them."""
        each = int(self.sampling_options.get("n_steps_each", self.sample_steps))
        counts = {"n_steps_each": each, "n_steps": self.num_scales * each}
        return {**{k: v for k, v in counts.items() if k in self.allowed_options(sampler)}, **super().sampling_defaults(sampler)}

    def _plan(self, sampler, steps, options):
        """`steps` keeps its NCSN meaning for Langevin: steps per level (annealed_langevin) or in all (langevin)."""
        sampler, opts, sigmas = super()._plan(sampler, steps, options)
        if steps is not None and sampler in LANGEVIN:
            opts["n_steps_each" if sampler == "annealed_langevin" else "n_steps"] = int(steps)
        return sampler, opts, sigmas
