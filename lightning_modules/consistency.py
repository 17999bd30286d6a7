"""Consistency models: Song, Dhariwal, Chen & Sutskever 2023 (CD, CT) and Song & Dhariwal 2023 (iCT).

A consistency function maps any point x_sigma of a probability-flow ODE trajectory
to the trajectory's end at sigma_min, so one evaluation turns sigma_max-scaled
noise into a sample. It is parametrized (as in the CM paper) as

    f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)),
    c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2),  c_out = (sigma - sigma_min) sd / sqrt(sigma^2 + sd^2),

with EDM's c_in and c_noise, so f(x, sigma_min) = x holds exactly for any net:
c_skip = 1 and c_out = 0 there. Training makes f agree on adjacent noise levels
sigma_n < sigma_{n+1} of the same trajectory:

- distillation (CD, Algorithm 2; `consistency_distillation.ConsistencyDistillation`, model=consistency):
  x_n from one Heun step of a TEACHER's PF-ODE;
- training (iCT; `consistency_training.ConsistencyTraining`, model=consistency_training): no teacher,
  x_n = x + sigma_n z with the same z;
- tuning (ECT; `consistency_tuning.ConsistencyTuning`, model=consistency_tuning): training's pairs, started
  from a pretrained EDM model, with a gap sigma_{n+1} - sigma_n that shrinks over training.

Options every variant takes: a denoising term beside the consistency loss (dsm_weight; Consistency Policy and
CTM keep one), and a smaller first noise draw for sampling (init_noise_scale; Consistency Policy's reduced
initial sample variance).

This file holds what both share: the parametrization, the target network f^- (an EMA of the student with
decay mu, or the student without gradient when mu = 0), the distance, the loss
lambda(sigma_n) d(f(x_{n+1}, sigma_{n+1}), f^-(x_n, sigma_n)) around the two hooks that differ (`pair`:
which levels; `lower_point`: x_n and lambda), and sampling.

Sampling (sampler=cm, samplers.consistency): f(sigma_max z, sigma_max), and for more steps alternate
"re-noise to sigma_k, f again" (Algorithm 1). f is not E[x0 | x], so the denoiser samplers are refused.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from torch import nn

import samplers
from difflab.errors import ConfigError
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import OmegaConf

from lightning_modules.base import DiffusionModule
from lightning_modules.edm import EDMPrecond
from samplers import grids

LOSSES = ("l2", "pseudo_huber")
HUBER_C = 0.00054  # iCT: c = 0.00054 sqrt(d)


# --- pieces that are plain functions (tested on closed forms) -------------------------------------


def _same_shapes(a: nn.Module, b: nn.Module) -> bool:
    """The two modules hold the same tensors by name and shape (one's weights load into the other)."""
    mine, theirs = a.state_dict(), b.state_dict()
    return mine.keys() == theirs.keys() and all(mine[k].shape == theirs[k].shape for k in mine)


class ConsistencyPrecond(EDMPrecond):
    """EDM's wrapper with the boundary-condition coefficients: f(x, sigma_min) = x for any net."""

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002):
        super().__init__(net, sigma_data)
        self.sigma_min = float(sigma_min)

    def coefficients(self, sigma: torch.Tensor):
        sd2 = self.sigma_data**2
        # sigma and sigma_min are rounded to sigma's dtype alike, so the shift is exactly 0 at sigma_min.
        shifted = sigma - self.sigma_min
        total = sigma**2 + sd2
        c_skip = sd2 / (shifted**2 + sd2)
        c_out = shifted * self.sigma_data / total.sqrt()
        c_in = total.rsqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


def pseudo_huber_c(dim: int, c0: float = HUBER_C) -> float:
    """iCT's c = 0.00054 sqrt(d) (0.03 on CIFAR-10's d = 3072)."""
    return c0 * math.sqrt(dim)


def pseudo_huber(diff: torch.Tensor, c0: float = HUBER_C) -> torch.Tensor:
    """(sqrt(||diff||^2 + c^2) - c) / sqrt(d) per sample, c = c0 sqrt(d).

    Divided by sqrt(d) (= sqrt(mean(diff^2) + c0^2) - c0), so the figure reads the same for
    2-D points and images; a constant factor changes nothing for Adam.
    """
    return (diff.flatten(1).pow(2).mean(1) + c0**2).sqrt() - c0


def ict_pair_probs(sigmas: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """p(i) for the pair (sigma_i, sigma_{i+1}) of an ascending grid: the log-normal mass between them, normalized."""
    log_s = sigmas.double().log()
    cdf = torch.special.erf((log_s - p_mean) / (math.sqrt(2) * p_std))
    mass = cdf[1:] - cdf[:-1]
    return mass / mass.sum()


def _has_dropout(net: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in net.modules())


# --- the method ------------------------------------------------------------------------------------


class ConsistencyModel(DiffusionModule):
    """What consistency distillation and consistency training share; a subclass says which pairs of levels
    are trained (`pair`, `num_scales_at`) and where the lower point of a pair comes from (`lower_point`)."""

    provides = samplers.CONSISTENCY
    quick_sampling = {"sampler": "cm", "steps": 1}
    # init_noise_scale < 1: the first draw from init_noise_scale * sigma_max * z (Consistency Policy's reduced variance)
    default_sampling = {"sampler": "cm", "steps": 1, "options": {"init_noise_scale": 1.0}}
    default_mu: float = 0.0
    default_loss: str = "pseudo_huber"

    def __init__(
        self,
        net,
        optimizer,
        scheduler=None,
        data_shape=(),
        cond_dim=None,
        clip_denoised: bool = False,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        mu: float | None = None,
        loss: str | None = None,
        huber_c: float = HUBER_C,
        cm_sigmas=None,
        dsm_weight: float = 0.0,
        sampling: dict | None = None,
    ):
        super().__init__(net, optimizer, scheduler, data_shape, cond_dim, clip_denoised, sampling)
        loss = loss or self.default_loss
        mu = self.default_mu if mu is None else mu
        if loss == "lpips":
            raise ConfigError(
                "model.loss=lpips is not available: LPIPS needs pretrained VGG/AlexNet weights, which this project "
                "does not ship or download; use model.loss=l2 or model.loss=pseudo_huber"
            )
        if loss not in LOSSES:
            raise ConfigError(f"model.loss must be one of {LOSSES}, got {loss!r}")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < model.sigma_min < model.sigma_max, got {sigma_min}, {sigma_max}")
        if not 0.0 <= mu < 1.0:
            raise ConfigError(f"model.mu (the target network's EMA decay) must be in [0, 1), got {mu}")
        if sigma_data <= 0:
            raise ConfigError(f"model.sigma_data must be positive, got {sigma_data}")
        init_noise_scale = self.sampling_options["init_noise_scale"]
        if dsm_weight < 0 or not 0 < init_noise_scale <= 1:
            raise ConfigError(f"need model.dsm_weight >= 0 and 0 < model.sampling.options.init_noise_scale <= 1, got "
                              f"{dsm_weight}, {init_noise_scale}")
        self.sigma_data = float(sigma_data)
        self.rho = float(rho)
        self.mu = float(mu)
        self.dsm_weight = float(dsm_weight)
        self.loss_name = loss
        self.huber_c = float(huber_c)
        self.cm_sigmas = None if cm_sigmas is None else [float(s) for s in cm_sigmas]
        # The range actually trained on is stored in the checkpoint: a teacher can narrow it at fit time,
        # and load_module rebuilds the module from the config, which still has the values asked for.
        self.register_buffer("trained_sigmas", torch.tensor([sigma_min, sigma_max], dtype=torch.float32))
        self._register_load_state_dict_pre_hook(_rename_old_buffer)
        self.register_load_state_dict_post_hook(_after_load)
        self._sync_sigma_range()
        self._check_cm_sigmas()
        self.has_dropout = _has_dropout(net)
        # mu > 0: the target is a separate, non-trainable EMA of the student, saved with it so a resume restores it.
        self.target_net = None
        if self.mu > 0:
            self.target_net = _frozen_copy(net)
        self._grid_cache: dict = {}

    # --- noise levels -------------------------------------------------------------------------
    def _sync_sigma_range(self) -> None:
        self.sigma_min, self.sigma_max = (float(v) for v in self.trained_sigmas.tolist())

    def _set_sigma_range(self, sigma_min: float, sigma_max: float) -> None:
        self.trained_sigmas.copy_(torch.tensor([sigma_min, sigma_max], dtype=self.trained_sigmas.dtype))
        self._sync_sigma_range()
        self._grid_cache.clear()

    def _check_cm_sigmas(self) -> None:
        if self.cm_sigmas is None:
            return
        s = self.cm_sigmas
        if not s or any(b >= a for a, b in zip(s, s[1:])) or s[-1] <= self.sigma_min or s[0] > self.sigma_max * (1 + 1e-6):
            raise ConfigError(
                f"model.cm_sigmas={s} must be strictly decreasing within (sigma_min, sigma_max] = "
                f"({self.sigma_min:.4g}, {self.sigma_max:.4g}] (usually starting at sigma_max)"
            )

    def train_grid(self, n: int, device=None) -> torch.Tensor:
        """The n Karras levels sigma_1 = sigma_min < ... < sigma_n = sigma_max, ascending (float64, cached)."""
        key = (n, str(device))
        if key not in self._grid_cache:
            self._grid_cache = {k: v for k, v in self._grid_cache.items() if k[0] == n}  # N(k) changes: keep few
            self._grid_cache[key] = grids.karras(n, self.sigma_min, self.sigma_max, self.rho).flip(0).to(device)
        return self._grid_cache[key]

    def grid_pair(self, n: int, batch_size: int, device, generator=None, p_mean: float | None = None,
                  p_std: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Adjacent levels of the n-level training grid: the pair index uniform, or (p_mean given) drawn with
        iCT's log-normal mass between the two levels."""
        grid = self.train_grid(n, device)
        if p_mean is None:
            idx = torch.randint(0, n - 1, (batch_size,), device=device, generator=generator)
        else:
            key = (n, str(device), "probs", p_mean, p_std)
            if key not in self._grid_cache:
                self._grid_cache[key] = ict_pair_probs(grid, p_mean, p_std)
            idx = torch.multinomial(self._grid_cache[key], batch_size, replacement=True, generator=generator)
        return grid[idx], grid[idx + 1]

    def pair(self, batch_size: int, device, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma_n, sigma_{n+1}) per sample, float64."""
        raise NotImplementedError(f"{type(self).__name__} must say which pairs of levels it trains on")

    def lower_point(self, x0, x_hi, z, sigma_hi, sigma_lo, cond) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_n, lambda(sigma_n)): the pair's lower point on x_hi's trajectory and the pair's weight."""
        raise NotImplementedError(f"{type(self).__name__} must say where a pair's lower point comes from")

    # --- networks ------------------------------------------------------------------------------
    def _precond(self, net: nn.Module, slot: str) -> ConsistencyPrecond:
        # Not registered (it would store every weight twice, see EDM.precond); rebuilt when the net or
        # sigma_min changes, which costs nothing.
        cached = self.__dict__.get(slot)
        if cached is None or cached.net is not net or cached.sigma_min != self.sigma_min:
            cached = ConsistencyPrecond(net, self.sigma_data, self.sigma_min)
            self.__dict__[slot] = cached
        return cached

    def consistency_fn(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        """The student f(x, sigma); sigma a scalar or (B,)."""
        return self._precond(self.net, "_precond_student")(x, sigma, cond)

    @torch.no_grad()
    def target_fn(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        """f^-: the EMA target network when mu > 0, else the student without gradient."""
        if self.target_net is None:
            return self._precond(self.net, "_precond_student")(x, sigma, cond)
        return self._precond(self.target_net, "_precond_target")(x, sigma, cond)

    @torch.no_grad()
    def update_target(self) -> None:
        """theta^- <- mu theta^- + (1 - mu) theta, after every optimizer step."""
        if self.target_net is None:
            return
        target, online = list(self.target_net.parameters()), list(self.net.parameters())
        torch._foreach_lerp_(target, [p.detach() for p in online], 1.0 - self.mu)
        for tb, b in zip(self.target_net.buffers(), self.net.buffers()):
            tb.copy_(b)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.update_target()

    # --- starting from a trained diffusion model ---------------------------------------------------
    def resuming(self) -> bool:
        # Lightning restores a checkpoint only after setup (overwriting a warm start anyway); train.py's config
        # says beforehand whether this run resumes.
        return bool((self.run_config or {}).get("ckpt_path")) or (self._trainer is not None and self._trainer.ckpt_path is not None)

    def warm_start_refusal(self, source) -> str | None:
        """Why the student cannot start from `source`'s net (a Teacher of teachers.py), or None."""
        # Only an EDM net sees what the student's net sees (c_in x, c_noise): a DDPM or score-SDE net is fed
        # x_t and t, so its weights would be a poor start.
        if source.kind != "edm":
            return f"a {source.kind} model's net is fed x_t and t, not EDM's c_in x and c_noise"
        student_cfg = (self.run_config or {}).get("net")
        source_cfg = (source.config or {}).get("net")
        if student_cfg is not None and source_cfg is not None:
            as_dict = lambda c: OmegaConf.to_container(OmegaConf.create(c), resolve=True)  # noqa: E731
            same = as_dict(student_cfg) == as_dict(source_cfg)
        else:
            same = _same_shapes(self.net, source.module.net)
        if not same:
            return "its net settings differ from the student's (net.*)"
        # with camera images the net reads the encoder's features, so the encoder comes along or nothing does
        mine_enc, their_enc = self.obs_encoder, getattr(source.module, "obs_encoder", None)
        if (mine_enc is None) != (their_enc is None):
            return "it sees camera images and the student does not" if mine_enc is None else "the student sees camera images and it does not"
        if mine_enc is not None and not _same_shapes(mine_enc, their_enc):
            return "its observation encoder differs from the student's (obs_encoder.*)"
        if float(source.module.sigma_data) != self.sigma_data:
            return f"its sigma_data={source.module.sigma_data} differs from model.sigma_data={self.sigma_data}"
        return None

    def warm_start_from(self, source) -> None:
        """Copy `source`'s net into the student (and its target); the caller has checked warm_start_refusal."""
        state = source.module.net.state_dict()
        self.net.load_state_dict(state)
        if self.target_net is not None:
            self.target_net.load_state_dict(state)
        if self.obs_encoder is not None:
            self.obs_encoder.load_state_dict(source.module.obs_encoder.state_dict())
        rank_zero_info(f"warm start: the student starts from the net of {source.path}")

    # --- the loss ------------------------------------------------------------------------------
    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """d(a, b) per sample: mean squared error (l2) or iCT's pseudo-Huber (see `pseudo_huber`)."""
        diff = (a - b).float()
        if self.loss_name == "l2":
            return diff.flatten(1).pow(2).mean(1)
        return pseudo_huber(diff, self.huber_c)

    def loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        x0, cond = batch["x"], batch.get("cond")
        shape = (-1, *([1] * (x0.dim() - 1)))
        sigma_lo, sigma_hi = self.pair(x0.shape[0], x0.device, generator)
        z = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_hi = x0 + sigma_hi.to(x0.dtype).reshape(shape) * z
        # the lower point may come from a teacher, which reads the raw observation through its own encoder
        x_lo, weight = self.lower_point(x0, x_hi, z, sigma_hi, sigma_lo, batch.get("obs", cond))
        # With dropout, f and f^- see the same mask (the RNG is replayed), so their gap measures consistency only.
        devices = [x0.device.index or 0] if x0.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=self.has_dropout, device_type="cuda"):
            student = self.consistency_fn(x_hi, sigma_hi, cond)
        target = self.target_fn(x_lo, sigma_lo, cond)
        loss = (weight.to(student.dtype) * self.distance(student, target)).mean()
        if self.dsm_weight > 0:
            # Denoising score matching on the same output (Consistency Policy / CTM keep such a term): it pulls f
            # toward E[x0 | x], which is the trajectory's end only as sigma -> 0, so it is a regulariser to weigh.
            loss = loss + self.dsm_weight * self.distance(student, x0).mean()
        return loss

    # --- sampling ------------------------------------------------------------------------------
    def sample_sigmas(self, steps: int | None = None) -> list[float]:
        """Where f is evaluated: model.cm_sigmas when its length matches `steps` (or steps is unset); else
        sigma_max and the next steps - 1 levels of a (steps + 1)-level Karras grid (its last level, sigma_min,
        would be wasted: f is the identity there). The papers tune the 2-step level (0.821 for iCT on
        CIFAR-10); set model.cm_sigmas=[80,0.821] to use such a choice."""
        if steps is None:
            steps = len(self.cm_sigmas) if self.cm_sigmas else self.sample_steps
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if self.cm_sigmas is not None and len(self.cm_sigmas) == steps:
            return list(self.cm_sigmas)
        if steps == 1:
            return [self.sigma_max]
        return grids.karras(steps + 1, self.sigma_min, self.sigma_max, self.rho)[:-1].tolist()

    def first_draw_std(self, sigma: float, options: dict) -> float:
        """sigma_max shrunk by init_noise_scale (model.init_noise_scale, or the call's): Consistency Policy's
        reduced initial sample variance, which lands the draw nearer the data's typical set."""
        scale = float(options.get("init_noise_scale", self.sampling_options["init_noise_scale"]))
        if not 0 < scale <= 1:
            raise ConfigError(f"init_noise_scale must be in (0, 1], got {scale}")
        return scale * sigma

    @property
    def sample_steps(self) -> int:
        return len(self.cm_sigmas) if self.cm_sigmas else self._sample_steps

    @sample_steps.setter
    def sample_steps(self, steps: int) -> None:  # the sampling block's steps (model.cm_sigmas, when set, wins)
        self._sample_steps = int(steps)

    @property
    def sigma_range(self) -> tuple[float, float]:
        return self.sigma_min, self.sigma_max

    def denoise(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        """The consistency function f(x, sigma): the end of x's trajectory (what sampler=cm evaluates)."""
        return self.consistency_fn(x, sigma, cond)

    def grid(self, sampler: str, steps: int, options: dict | None = None) -> torch.Tensor:
        return torch.tensor(self.sample_sigmas(steps), dtype=torch.float64)

    method_options = {"cm": ("init_noise_scale",)}

    def sampling_defaults(self, sampler: str) -> dict:
        return {"sigma_min": self.sigma_min, **super().sampling_defaults(sampler)}


def _rename_old_buffer(state_dict, prefix, *args) -> None:
    # Checkpoints before the shared core stored the range as `sigma_range`, now the name of the range property.
    old = state_dict.pop(prefix + "sigma_range", None)
    if old is not None:
        state_dict.setdefault(prefix + "trained_sigmas", old)


def _after_load(module: ConsistencyModel, incompatible_keys) -> None:
    module._sync_sigma_range()


def _frozen_copy(net: nn.Module) -> nn.Module:
    target = copy.deepcopy(net)
    target.requires_grad_(False)
    return target
