"""What every method shares: optimisation, logging, validation with fixed noise, RNG in checkpoints.

A method subclasses `DiffusionModule` and implements `loss(batch, generator)`, `denoise(x, sigma, cond)` in the
VE form and `sigma_range`; sampling (every sampler of the `samplers` registry) comes from here.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable

import lightning.pytorch as pl
import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

import samplers
from difflab.errors import ConfigError, TrainingDiverged
from lightning_modules.exposure_fixes import scale_eps
from lightning_modules.paths import VE_PATH
from samplers import grids
from samplers.guidance import Guided
from samplers.inpainting import Inpainted
from samplers.likelihood import dequantize, log_likelihood

VAL_SEED = 12345  # validation noise is fixed so val/loss is comparable across steps

GUIDANCE_OPTIONS = ("guidance", "guidance_interval", "guidance_rescale", "guide")  # samplers.guidance, on every sampler of a denoiser

# NCSN's annealed Langevin: eps / sigma_L^2 = 2e-5 / 0.01^2 (Song & Ermon 2019)
LANGEVIN_RATIO = 0.2


class DiffusionModule(pl.LightningModule):
    """A method: a loss, and for sampling a VE-form denoiser with its noise range, native grid and defaults.

    The sampling contract lives here once: sample() resolves the sampler in the `samplers` registry, refuses
    options it does not take, builds the grid, draws the prior and runs the sampler on `denoise`.
    """

    # The method's sampling block when its config gives none (`model.sampling` in every model config): the default
    # sampler, its steps, and defaults for any registry or method option. Handed to the base as data: no method
    # mirrors a sampler setting as a constructor parameter, and sample.py reaches every option by name.
    default_sampling: dict = {"sampler": "", "steps": 1, "options": {}}
    # Checkpoints from before the block stored sampler settings as flat model.* keys: these name where a key whose
    # name differs went (lightning_modules.checkpoint.current_config moves the others into options by name).
    legacy_sampling: dict = {"sampler": "sampler", "sample_steps": "steps"}
    # What the model provides: samplers.DENOISER (E[x0 | x]) or samplers.CONSISTENCY (an ODE trajectory's end).
    provides: str = samplers.DENOISER
    # Options a method adds to some samplers (wrappers around its denoiser or grid), by sampler name.
    method_options: dict[str, tuple[str, ...]] = {}
    single_level_langevin: bool = False  # NCSN keeps plain Langevin as its lesson's baseline
    # Samplers whose grid is fixed by the method (so `steps` is refused), e.g. DDPM's ancestral over all levels.
    fixed_grid: tuple[str, ...] = ()
    # The cheapest valid setting, for trainer.fast_dev_run (a config check, not a figure).
    quick_sampling: dict = {}
    # True: the method builds its own net from model.* (build_model passes net=None and ignores net.*).
    owns_net: bool = False

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        data_shape: tuple[int, ...] = (),
        cond_dim: int | None = None,
        clip_denoised: bool = False,
        sampling: dict | None = None,
    ):
        super().__init__()
        self.configure_sampling(sampling)
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.data_shape = tuple(data_shape)
        self.cond_dim = cond_dim
        self.clip_denoised = clip_denoised
        # Set by train.py: the resolved run config, stored in every checkpoint so a checkpoint can rebuild itself.
        self.run_config: dict | None = None
        # Set by build_model for image observations (lightning_modules.nets.obs_encoder): it turns the observation dict
        # of a batch into the flat cond, trained end to end with the method, so no method needs to know about pixels.
        self.obs_encoder: nn.Module | None = None
        self.obs_spec: dict | None = None  # what rebuilds obs_encoder (the datamodule's obs_spec), saved in checkpoints
        # Condition dropout (model.cond_drop, set by build_model): the probability that a training example's condition
        # is replaced by the learned null condition, which classifier-free guidance then contrasts with.
        self.cond_drop = 0.0
        self.null_cond: nn.Parameter | None = None

    @classmethod
    def net_cond_dim(cls, cond_dim: int | None) -> int | None:
        """The size of the condition the net is built for: the data's, unless a method feeds the net more through it
        (MeanFlow's interval t - r)."""
        return cond_dim

    def configure_sampling(self, block: dict | None) -> None:
        """model.sampling = {sampler, steps, options}, over the method's default_sampling (options merge key by key)."""
        if OmegaConf.is_config(block):  # Hydra's instantiate hands nested settings over as DictConfig
            block = OmegaConf.to_container(block, resolve=True)
        block = dict(block or {})
        unknown = sorted(set(block) - {"sampler", "steps", "options"})
        if unknown:
            raise ConfigError(f"model.sampling.{unknown[0]} is not a setting: the block is {{sampler, steps, options: {{...}}}}")
        default = type(self).default_sampling
        self.sampler = str(block.get("sampler") or default["sampler"])
        steps = block.get("steps")
        if isinstance(steps, bool) or (steps is not None and (not isinstance(steps, int) or steps < 1)):
            raise ConfigError(f"model.sampling.steps={steps} is not valid: a positive number of steps")
        self.sample_steps = int(default["steps"] if steps is None else steps)
        options = block.get("options") or {}
        if not isinstance(options, dict):
            raise ConfigError(f"model.sampling.options={options!r} is not valid: a mapping of option: value")
        self.sampling_options = {**default["options"], **options}

    def enable_cond_drop(self, p: float) -> None:
        """Train with condition dropout at rate p: a learned null condition in the (encoded) condition's space, so
        every net and every method take it as they take any condition."""
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"model.cond_drop={p} is not valid: a probability in [0, 1)")
        if p > 0 and self.cond_dim is None:
            raise ConfigError("model.cond_drop needs a conditional model (labels or observations in the data); this data "
                              "has no condition: drop model.cond_drop")
        self.cond_drop = float(p)
        if p > 0 and self.null_cond is None:
            self.null_cond = nn.Parameter(torch.zeros(int(self.cond_dim)))

    def drop_cond(self, batch: dict) -> dict:
        """Each example's (encoded) condition replaced by the null one with probability cond_drop (training only); the
        batch's `cond_dropped` (B,) says which (MeanFlow's guided target treats those rows apart)."""
        cond = batch.get("cond")
        if self.null_cond is None or self.cond_drop == 0.0 or not torch.is_tensor(cond):
            return batch
        drop = torch.rand(cond.shape[0], device=cond.device) < self.cond_drop
        flat = cond.reshape(cond.shape[0], -1)
        null = self.null_cond.to(flat.dtype).expand_as(flat)
        return {**batch, "cond": torch.where(drop[:, None], null, flat).reshape(cond.shape), "cond_dropped": drop}

    # --- what a method provides -------------------------------------------------------------
    def loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def denoise(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        """D(x; sigma) ~ E[x0 | x0 + sigma n = x] in the VE form, sigma a scalar or (B,)."""
        raise NotImplementedError

    @property
    def sigma_range(self) -> tuple[float, float]:
        """The (sigma_min, sigma_max) the denoiser was trained on, in the VE form."""
        raise NotImplementedError

    def grid(self, sampler: str, steps: int, options: dict | None = None) -> torch.Tensor:
        """The method's native levels for `sampler` (decreasing float64 sigmas): Karras' rho = 7 grid and a final 0
        unless a method knows better (its trained table, its time grid)."""
        lo, hi = self.sigma_range
        return grids.append_zero(grids.karras(steps, lo, hi, 7.0))

    # The method's noise path (lightning_modules.paths: alpha(t), sigma(t) and the VE conversions): prior_std, to_ve
    # and likelihood_bounds read it, so a method on a path writes none. VE methods keep this default.
    path = VE_PATH

    def prior_std(self, sigma: float) -> float:
        """The std of the VE-form state at the first level: sigma for VE methods, more where the method's own prior
        is unit noise in scaled coordinates (a VP x_T ~ N(0, I) is x_T / sqrt(abar) in VE form)."""
        return self.path.prior_ve_std(sigma)

    def first_draw_std(self, sigma: float, options: dict) -> float:
        """The std sample() draws the first state with: the prior's, unless a sampling option shrinks it."""
        return self.prior_std(sigma)

    def to_ve(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """A state in the method's own coordinates at level sigma, in the VE form (identity for VE methods)."""
        return self.path.to_ve(x, sigma)

    def sampling_defaults(self, sampler: str) -> dict:
        """The sampling block's options that `sampler` takes (a call overrides them)."""
        allowed = self.allowed_options(sampler)
        return {k: v for k, v in self.sampling_options.items() if k in allowed}

    def eps_lambda(self, eps_scale: float, options: dict | None = None):
        """Epsilon Scaling's lambda (a constant here; the DDPM family also has a linear schedule in t)."""
        return float(eps_scale)

    def sampling_denoiser(self, cond, sampler: str, options: dict):
        """The denoiser the samplers see: the method's, classifier-free guided with guidance=w (the conditional and null
        passes in one batch), with Epsilon Scaling when eps_scale is set, clipped to the data range with
        clip_denoised (every x0 estimate, as DDPM's x0 clip); a method may wrap it further."""
        guidance, guide = options.get("guidance"), options.get("guide")
        if guidance is not None and float(guidance) != 1.0:
            null = None if guide is not None else self.null_cond.to(cond.dtype).expand(cond.shape[0], -1).reshape(cond.shape)
            denoiser = options["_guided"] = Guided(self.denoise, cond, null, float(guidance), options.get("guidance_interval"),
                                                   guide=None if guide is None else guide.denoise,
                                                   rescale=float(options.get("guidance_rescale") or 0.0))
        else:
            denoiser = lambda x, sigma: self.denoise(x, sigma, cond)  # noqa: E731
        if options.get("eps_scale") is not None:
            denoiser = scale_eps(denoiser, self.eps_lambda(float(options["eps_scale"]), options))
        if options.get("inpaint") is not None:  # real-time chunking's pull toward the previous chunk (envs.execution)
            target, weights = options["inpaint"]
            denoiser = Inpainted(denoiser, target, weights, float(options.get("rtc_max_guidance") or 5.0))
        return samplers.clipped(denoiser) if self.clip_denoised else denoiser

    def refusal(self, sampler: str) -> str | None:
        """Why `sampler` is not defined for this method, or None."""
        spec = samplers.get(sampler)
        if sampler == "langevin" and not self.single_level_langevin and spec.needs == self.provides:
            return ("single-level Langevin is NCSN's baseline (Song & Ermon 2019, Sec. 3: it mixes between modes only "
                    "with annealing); on this method's levels use sampler=annealed_langevin")
        if spec.needs == self.provides:
            return None
        if self.provides == samplers.FLOW_MAP:
            return ("a MeanFlow model's net is an average velocity u(z, r, t), not E[x0 | x] or a consistency function: "
                    "only sampler=mean_flow is defined")
        if spec.needs == samplers.FLOW_MAP:
            return "mean_flow jumps with an average velocity u(z, r, t): it needs a model=mean_flow checkpoint"
        if self.provides == samplers.CONSISTENCY:
            return "a consistency function's output is the end of its ODE trajectory, not E[x0 | x]: only sampler=cm is defined"
        return "cm needs a consistency function: one denoiser call at sigma_max gives E[x0 | x_T], near the data mean, not a sample"

    def resolve_sampler(self, sampler: str | None) -> str:
        """A method's own name for a registry sampler (ScoreSDE's 'ode'), or the name itself."""
        return sampler or self.sampler

    # --- the sampling contract ---------------------------------------------------------------
    def samplers(self) -> list[str]:
        """The registry samplers defined for this method."""
        return [name for name in samplers.SAMPLERS if self.refusal(name) is None]

    def check_sampling(self, sampler: str | None = None, **options) -> str:
        """The registry sampler to use, after refusing undefined samplers and options it does not take (None values
        are "not given")."""
        name = type(self).__name__
        asked = sampler or self.sampler
        sampler = self.resolve_sampler(asked)
        if sampler not in samplers.SAMPLERS:
            raise ConfigError(f"sampler={asked!r} is not a sampler: use one of {', '.join(self.samplers())} (for {name})")
        why = self.refusal(sampler)
        if why is not None:
            raise ConfigError(f"sampler={asked} is not defined for {name}: {why}")
        allowed = self.allowed_options(sampler)
        self.check_guidance(options)
        self.check_inpaint(options)
        for key, value in options.items():
            if value is None or key in allowed:
                continue
            takers = [s for s in self.samplers() if key in self.allowed_options(s)]
            hint = f"it applies to sampler={' / '.join(takers)}" if takers else f"no sampler of {name} takes it"
            shown = sorted(allowed - {"guide", "inpaint"})  # a model (guide_ckpt=) and execution=rtc's tensors
            raise ConfigError(f"{key}= is not an option of {name}'s sampler={asked} (it takes: "
                              f"{', '.join(shown) or 'nothing'}); {hint}: drop {key}=")
        return sampler

    def check_default_sampler(self) -> None:
        """At construction: model.sampling.sampler must name a sampler defined for the method, and every option of the
        block must be one that some sampler of the method takes (the block may set options of other samplers)."""
        try:
            self.check_sampling(self.sampler)
        except ConfigError as err:
            raise ConfigError(f"model.sampling.sampler: {err}") from None
        known = set().union(*(self.allowed_options(s) for s in self.samplers())) | set(GUIDANCE_OPTIONS)
        for key in self.sampling_options:
            if key not in known:
                raise ConfigError(f"model.sampling.options.{key} is not an option of any sampler of {type(self).__name__} "
                                  f"(they take: {', '.join(sorted(known - {'guide', 'steps', 'inpaint'}))}): drop it")

    def check_inpaint(self, options: dict) -> None:
        inpaint = options.get("inpaint")
        if inpaint is not None and not (isinstance(inpaint, (tuple, list)) and len(inpaint) == 2 and all(torch.is_tensor(t) for t in inpaint)):
            raise ConfigError("inpaint= is the (target, weights) pair that execution=rtc builds from the previous chunk; it is "
                              "not a command-line setting: use evaluate.py execution=rtc inference_delay=d")
        beta = options.get("rtc_max_guidance")
        if beta is not None and (isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta < 0):
            raise ConfigError(f"rtc_max_guidance={beta} is not valid: a number >= 0 (real-time chunking's beta; 5 in the paper)")

    def check_guidance(self, options: dict) -> None:
        """guidance= / guidance_interval= need a model trained with condition dropout (its learned null condition), or
        a guide (autoguidance), which works for unconditional models too."""
        given = {k: options[k] for k in GUIDANCE_OPTIONS if options.get(k) is not None}
        if not given:
            return
        name = type(self).__name__
        if self.provides != samplers.DENOISER:
            raise ConfigError(f"guidance= is a wrapper of a denoiser; a {name} has none (it samples with sampler=cm)")
        guide = given.get("guide")
        if guide is not None:
            self.check_guide(guide, given)
        elif self.cond_dim is None:
            raise ConfigError(f"guidance= needs a conditional model for classifier-free guidance, and this {name} was trained "
                              "without a condition: train on labelled data (e.g. data.labels=true), or guide it with a weaker "
                              "checkpoint of the same data (guide_ckpt=, autoguidance)")
        if guide is None and self.null_cond is None:
            raise ConfigError(f"guidance= contrasts the condition with a learned null condition, which this {name} was "
                              "trained without: retrain with model.cond_drop=0.1 (condition dropout), or guide it with a "
                              "weaker checkpoint of the same data (guide_ckpt=, autoguidance)")
        w = given.get("guidance", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise ConfigError(f"guidance={w} is not valid: a number >= 0 (1: the conditional model, 0: the unconditional one)")
        phi = given.get("guidance_rescale")
        if phi is not None and (isinstance(phi, bool) or not isinstance(phi, (int, float)) or not 0 <= phi <= 1):
            raise ConfigError(f"guidance_rescale={phi} is not valid: a number in [0, 1] (CFG-rescale's phi; 0.7 in Lin et al. 2024)")
        if phi is not None and "guidance" not in given:
            raise ConfigError("guidance_rescale= rescales guided estimates: pass guidance=w as well, e.g. guidance=3 guidance_rescale=0.7")
        interval = given.get("guidance_interval")
        if interval is not None and (not isinstance(interval, (list, tuple)) or len(interval) != 2
                                     or not all(isinstance(v, (int, float)) for v in interval) or not 0 <= interval[0] < interval[1]):
            raise ConfigError(f"guidance_interval={interval} is not valid: [sigma_lo, sigma_hi] with 0 <= lo < hi "
                              "(guidance only for sigma in that range, e.g. [0.28, 5.42] in EDM2's units)")

    def check_guide(self, guide, given: dict) -> None:
        """Autoguidance's guide: a denoiser of the same data (shape and condition), used with a guidance scale."""
        if "guidance" not in given:
            raise ConfigError("guide_ckpt= (autoguidance) needs a scale: pass guidance=w as well, e.g. guidance=2")
        if not isinstance(guide, nn.Module):
            raise ConfigError(f"guide={guide!r} is not a model: pass the guide's checkpoint as guide_ckpt=PATH")
        if getattr(guide, "provides", None) != samplers.DENOISER:
            raise ConfigError(f"the guide is a {type(guide).__name__}, which has no denoiser; autoguidance needs a diffusion-"
                              "family checkpoint (ddpm, edm, ncsn, score SDEs, flow matching) of the same data")
        if tuple(guide.data_shape) != tuple(self.data_shape) or guide.cond_dim != self.cond_dim:
            raise ConfigError(f"the guide models data of shape {tuple(guide.data_shape)} with cond_dim={guide.cond_dim}, this "
                              f"model {tuple(self.data_shape)} with cond_dim={self.cond_dim}: autoguidance needs a weaker "
                              "model of the same data and condition (a smaller net or an earlier checkpoint of a run like this one)")

    def allowed_options(self, sampler: str) -> set[str]:
        allowed = set(samplers.get(sampler).options) | set(self.method_options.get(sampler, ()))
        if self.provides == samplers.DENOISER:
            allowed.add("eps_scale")  # a wrapper of any denoiser (lightning_modules.exposure_fixes)
            allowed |= {"inpaint", "rtc_max_guidance"}  # samplers.inpainting, set by execution=rtc
            allowed |= {"guidance", "guide", "guidance_rescale"}  # autoguidance needs no null condition (check_guidance)
            if self.null_cond is not None:
                allowed |= set(GUIDANCE_OPTIONS)  # samplers.guidance, with the learned null condition
        if sampler not in self.fixed_grid:
            allowed.add("steps")
        return allowed

    def _plan(self, sampler, steps, options):
        sampler = self.check_sampling(sampler, steps=steps, **options)
        given = {k: v for k, v in options.items() if v is not None}
        opts = {**self.sampling_defaults(sampler), **given, "_steps": int(self.sample_steps if steps is None else steps)}
        sigmas = self.grid(sampler, opts["_steps"], opts)
        if sampler == "annealed_langevin":
            self._langevin_step(opts, sigmas)
        return sampler, opts, sigmas

    def _langevin_step(self, opts: dict, sigmas: torch.Tensor) -> None:
        """Annealed Langevin's alpha_i = eps sigma_i^2 / sigma_L^2 contracts a level's Gaussian only while
        eps / sigma_L^2 < 2. NCSN's own eps (2e-5 at sigma_L = 0.01, a ratio of 0.2) is the default; on another
        method's levels (EDM's sigma_L = 0.002) the same ratio is kept, and an eps past the bound is refused."""
        lowest = float(sigmas[sigmas > 0].min())
        opts.setdefault("step_lr", LANGEVIN_RATIO * lowest**2)
        if opts["step_lr"] / lowest**2 >= 2.0:
            raise ConfigError(f"step_lr={opts['step_lr']:g} diverges on {type(self).__name__}'s lowest level sigma={lowest:g}: "
                              f"annealed Langevin needs step_lr < 2 * sigma_min^2 = {2 * lowest**2:.3g}; use step_lr="
                              f"{LANGEVIN_RATIO * lowest**2:.3g} (NCSN's ratio) or leave it unset")

    def nfe(self, sampler: str | None = None, steps: int | None = None, **options) -> int | None:
        """Network evaluations per sample for a sampler setting (None for an adaptive solver: sample(...,
        return_nfe=True) returns what it spent)."""
        sampler, opts, sigmas = self._plan(sampler, steps, options)
        count = samplers.get(sampler).nfe(sigmas.tolist(), opts)
        w = opts.get("guidance")
        if count is None or w is None or float(w) in (0.0, 1.0):
            return count
        # two net evaluations per guided call; with an interval, which calls are guided depends on where the sampler
        # evaluates (Heun's second point, ...): sample(..., return_nfe=True) counts them
        return None if opts.get("guidance_interval") is not None else 2 * count

    @torch.no_grad()
    def sample(self, num_samples: int, cond=None, sampler: str | None = None, steps: int | None = None,
               generator: torch.Generator | None = None, x_T: torch.Tensor | None = None, callback=None,
               progress: bool = False, return_nfe: bool = False, **options):
        """num_samples draws; x_T (the method's own coordinates) replaces the prior draw; callback(i, sigma, x) sees
        each VE-form state before it is denoised. return_nfe=True returns (samples, NFE per sample)."""
        cond = self.check_cond(cond, num_samples)
        sampler, opts, sigmas = self._plan(sampler, steps, options)
        spec = samplers.get(sampler)
        first = float(sigmas[0])
        if x_T is None:
            x = self.first_draw_std(first, opts) * self.prior_noise(num_samples, generator)
        else:
            x = self.to_ve(x_T, first)
        denoiser = self.sampling_denoiser(cond, sampler, opts)
        guided = opts.get("_guided")
        denoiser = samplers.Counted(denoiser, None if guided is None else (lambda: guided.cost))
        kwargs = {k: opts[k] for k in (*spec.options, "reread") if k in opts}
        x = spec.fn(denoiser, x, sigmas, generator=generator, callback=callback, progress=progress, **kwargs)
        if self.clip_denoised:
            x = x.clamp(-1.0, 1.0)
        return (x, denoiser.calls) if return_nfe else x

    @torch.no_grad()
    def sample_many(
        self, num_samples: int, batch_size: int = 1000, generator: torch.Generator | None = None, cond=None,
        progress: bool = False, return_nfe: bool = False, **kwargs
    ):
        """sample() in chunks of batch_size (memory stays bounded); one generator, so the result is reproducible.
        return_nfe=True also returns the NFE per sample (averaged over chunks: an adaptive solver's varies)."""
        from tqdm.auto import tqdm

        chunks, spent = [], 0.0
        with tqdm(total=num_samples, disable=not progress, desc="sampling") as bar:
            for start in range(0, num_samples, batch_size):
                n = min(batch_size, num_samples - start)
                part = None if cond is None else (
                    {k: v[start : start + n] for k, v in cond.items()} if isinstance(cond, dict) else cond[start : start + n])
                x, nfe = self.sample(n, cond=part, generator=generator, return_nfe=True, **kwargs)
                chunks.append(x.float().cpu())
                spent += nfe * n
                bar.update(n)
        x = torch.cat(chunks) if chunks else torch.empty((0, *self.data_shape))
        if not return_nfe:
            return x
        mean = spent / max(num_samples, 1)
        return x, int(mean) if mean == int(mean) else round(mean, 1)

    # --- likelihood ---------------------------------------------------------------------------
    def likelihood_bounds(self) -> tuple[float, float, float, float]:
        """(sigma_lo, sigma_hi, prior std at sigma_hi, mean_scale at sigma_lo): the data are read as the method's own
        state at sigma_lo (x_VE = x / mean_scale), the prior is N(0, std^2 I) in the VE form at sigma_hi."""
        lo, hi = self.sigma_range
        return lo, hi, self.prior_std(hi), self.path.mean_scale(lo)

    def bits_per_dim(self, x: torch.Tensor, cond=None, num_levels: int | None = 256, probe: str = "rademacher",
                     rtol: float | None = None, atol: float | None = None, generator: torch.Generator | None = None):
        """Bits/dim of a batch through the probability-flow ODE of `denoise` (samplers.likelihood); (bpd (B,), NFE).

        With `num_levels` (256 for 8-bit images in [-1, 1]) the data are dequantized and the result bounds the
        discrete data's bits/dim: v = k + u in [0, L)^D has log p_v = log p_y + D log(2 / L), so
        bpd = -log p_y / (D ln 2) + log2(L / 2) (+7 for L = 256), the offset Song et al. add for centered data.
        """
        if self.provides != samplers.DENOISER:
            raise ConfigError(f"metric=bpd needs a probability-flow ODE: {type(self).__name__} has no denoiser to integrate")
        cond = self.check_cond(cond, x.shape[0])
        y = x if num_levels is None else dequantize(x, num_levels, generator)
        lo, hi, prior, mean_scale = self.likelihood_bounds()
        rtol = self.sampling_options.get("rtol", 1e-5) if rtol is None else rtol
        atol = self.sampling_options.get("atol", 1e-5) if atol is None else atol
        d = x[0].numel()
        logp, nfe = log_likelihood(lambda v, s: self.denoise(v, s, cond), y / mean_scale, lo, hi, prior, probe, rtol, atol, generator)
        logp = logp - d * math.log(mean_scale)  # back to the density of the method's own coordinates
        bpd = -logp / (d * math.log(2))
        if num_levels is not None:
            bpd = bpd + math.log2(num_levels / 2)
        return bpd, nfe

    # --- helpers for methods ----------------------------------------------------------------
    def training_length(self, what: str) -> int:
        """The run's length in optimizer steps, for schedules that move over training: trainer.max_steps, else
        model.total_steps (a ConfigError saying `what` needs it when neither is set)."""
        trainer = self._trainer
        if trainer is not None and trainer.max_steps is not None and trainer.max_steps > 0:
            return int(trainer.max_steps)
        if getattr(self, "total_steps", None) is None:
            raise ConfigError(f"{what}: set trainer.max_steps or model.total_steps")
        return int(self.total_steps)

    def prior_noise(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn((num_samples, *self.data_shape), generator=generator, device=self._generator_device(generator))

    def _generator_device(self, generator: torch.Generator | None) -> torch.device:
        return generator.device if generator is not None else self.device

    def encode_cond(self, cond):
        """An observation dict (camera images, low-dim state) through the obs encoder; a flat cond as it is."""
        if not isinstance(cond, dict):
            return cond
        if self.obs_encoder is None:
            raise ValueError(f"cond is an observation dict ({sorted(cond)}) but this model has no obs_encoder: "
                             "train on image data with obs_encoder=... or pass the flat normalised history")
        return self.obs_encoder(cond)

    def encoded(self, batch: dict) -> dict:
        """The batch with its observation dict encoded (with gradients: the encoder trains with the method); the
        dict itself stays under "obs" for whatever has its own encoder (a distillation teacher)."""
        if not isinstance(batch.get("cond"), dict):
            return batch
        return {**batch, "cond": self.encode_cond(batch["cond"]), "obs": batch["cond"]}

    def check_cond(self, cond, num_samples: int):
        """The flat cond, checked; an observation dict is encoded first (every method's loss and sampler call this)."""
        cond = self.encode_cond(cond)
        if self.cond_dim is None and cond is not None:
            raise ValueError("this model was trained without conditioning: call sample(..., cond=None)")
        if self.cond_dim is not None:
            if cond is None:
                raise ValueError(f"this model is conditional (cond_dim={self.cond_dim}): pass cond of shape (N, {self.cond_dim})")
            if cond.shape[0] != num_samples:
                raise ValueError(f"cond has {cond.shape[0]} rows but num_samples={num_samples}")
        return cond

    # --- Lightning ----------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(self.drop_cond(self.encoded(batch)))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=batch["x"].shape[0])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # Record the first step whose loss is not finite without a device sync (a flag tensor on the device);
        # read it when Lightning logs anyway and before any checkpoint is written.
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        if getattr(self, "_first_nonfinite", None) is None or self._first_nonfinite.device != loss.device:
            self._first_nonfinite = torch.full((), -1, device=loss.device, dtype=torch.long)
            self._step_on_device = torch.full((), self.global_step, device=loss.device, dtype=torch.long)
        elif self.global_step != self._step_on_host:
            self._step_on_device += self.global_step - self._step_on_host  # a scalar kernel argument: no copy, no sync
        self._step_on_host = self.global_step
        bad = ~torch.isfinite(loss.detach()).all()
        self._first_nonfinite = torch.where((self._first_nonfinite < 0) & bad, self._step_on_device, self._first_nonfinite)
        if self.global_step % max(self.trainer.log_every_n_steps, 1) == 0:
            self.check_diverged()

    def check_diverged(self) -> None:
        """Stop with TrainingDiverged if any training loss so far was NaN or inf."""
        first = getattr(self, "_first_nonfinite", None)
        if first is None or int(first) < 0:
            return
        from difflab.checkpoint_io import divergence_message

        trainer = self.trainer
        io = getattr(trainer.strategy, "checkpoint_io", None)
        raise TrainingDiverged(divergence_message(io if hasattr(io, "last_saved") else None,
                                                  "the training loss first went non-finite there", int(first),
                                                  getattr(trainer, "ckpt_path", None)))

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        generator = torch.Generator(device=self.device).manual_seed(VAL_SEED + batch_idx)
        loss = self.loss(self.encoded(batch), generator=generator)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["x"].shape[0])
        return loss

    def optimizer_params(self):
        """What the optimizer gets: every parameter, or the net's own groups (net.optim_groups(), e.g. weight decay
        on weight matrices only) with the module's other parameters added to the first group."""
        split = getattr(self.net, "optim_groups", None)
        if split is None:
            return self.parameters()
        groups = split()
        grouped = {id(p) for g in groups for p in g["params"]}
        groups[0]["params"] = [*groups[0]["params"], *(p for p in self.parameters() if id(p) not in grouped)]
        return groups

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.optimizer_params())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning refuses to clip for an optimizer that unscales internally (fused Adam/AdamW) under every
        # mixed precision. Only fp16's loss scaler makes that unsafe: under bf16 (no scaler) the gradients are
        # already the true ones, so clip them directly and keep the fused step.
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if gradient_clip_val and scaler is None and getattr(optimizer, "_step_supports_amp_scaling", False):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if str(getattr(gradient_clip_algorithm, "value", gradient_clip_algorithm) or "norm") == "norm":
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._trainer is not None:
            self.check_diverged()  # never store the weights of a run whose loss went non-finite
        checkpoint["difflab"] = {
            "config": self.run_config,
            "data_shape": list(self.data_shape),
            "cond_dim": self.cond_dim,
            # camera images: what build_model needs to rebuild the observation encoder (None for state-only data)
            "obs_spec": self.obs_spec,
            "method": f"{type(self).__module__}.{type(self).__qualname__}",
        }
        # A policy's normalizers, observation keys and task travel with the weights, so the checkpoint acts alone.
        policy_spec = getattr(getattr(self._trainer, "datamodule", None), "policy_spec", None)
        if callable(policy_spec):
            checkpoint["policy"] = policy_spec()
        # Tensors and plain types only, so checkpoints load with torch.load(weights_only=True).
        np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Applied at on_train_start, right before the first resumed step: whatever Lightning does between loading
        # and training (building loaders, prefetching a batch) then cannot shift the streams the loss draws from.
        self._rng_to_restore = checkpoint.get("rng_states")
        self._resumed_step = int(checkpoint.get("global_step", 0))

    def on_train_start(self) -> None:
        states, self._rng_to_restore = getattr(self, "_rng_to_restore", None), None
        if states is None:
            return
        if self.trainer.world_size == 1:
            torch.set_rng_state(states["torch"])
            kind, keys, pos, has_gauss, gauss = states["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
            random.setstate(states["python"])
            if states["cuda"] is not None and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states["cuda"])
        else:
            # Only rank 0's state is saved: ranks must not share one stream, so derive a distinct one per rank.
            pl.seed_everything(self._resumed_step * 1000 + self.global_rank, workers=True, verbose=False)
