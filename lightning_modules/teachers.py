"""Trained diffusion models of this project seen as one thing: an EDM/VE denoiser for distillation.

Consistency distillation (Song et al. 2023) integrates a teacher's probability-flow
ODE in the variance-exploding form x = x0 + sigma n, where the ODE is
dx/dsigma = (x - D(x; sigma)) / sigma with D = E[x0 | x]. A `Teacher` exposes
`denoise(x, sigma, cond)` in that form and the [sigma_min, sigma_max] it was
trained on, whatever its own parametrization:

- edm: D is the module's `denoise`.
- vesde (ScoreSDE, sde=ve): the marginal is already x0 + sigma(t) n, so
  D = x + sigma^2 s(x, t(sigma)) (Tweedie), t(sigma) = log(sigma / sigma_min) / log(sigma_max / sigma_min).
- vpsde (ScoreSDE, sde=vp) and ddpm: x_VP = a x0 + sqrt(1 - a^2) n with a = sqrt(abar).
  Dividing by a gives x_VE = x_VP / a = x0 + sigma n with sigma = sqrt((1 - abar) / abar),
  so abar = 1 / (1 + sigma^2). To denoise x_VE at sigma: find the VP time with that
  sigma, feed x_VP = x_VE * sqrt(abar) to the model, read its output as eps and
  return D = x_VE - sigma * eps (x0 is the same in both coordinates).

Refused: ncsn (its annealed-Langevin levels have no ODE of their own), subvpsde
(its marginal std is 1 - abar, not sqrt(1 - abar): the change of variables above
does not give x0 + sigma n with Gaussian n of the right scale), bc_mse and
consistency checkpoints (no denoiser at all / already a distilled model).

A teacher is frozen (eval mode, no gradients) and deliberately not an nn.Module:
assigned to the student it stays out of the student's module tree, its
state_dict and its checkpoints, and the EMA callback never averages it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf
from difflab.errors import ConfigError

USABLE = ("edm", "vesde", "vpsde", "ddpm")
_USABLE_TEXT = "use edm, vesde, vpsde or ddpm"
_WHY_NOT = {
    "ncsn": "annealed Langevin on discrete levels has no probability-flow ODE to integrate",
    "subvpsde": "its marginal std is 1 - abar, so x / mean is not x0 + sigma n",
    "bc_mse": "a regression policy has no denoiser",
    "consistency": "already a one-step model; distill from its own teacher instead",
}


class Teacher:
    """A frozen denoiser D(x; sigma) ~ E[x0 | x0 + sigma n = x], valid for sigma in [sigma_min, sigma_max]."""

    kind = "?"

    def __init__(self, module: torch.nn.Module | None, sigma_min: float, sigma_max: float, path: str | None = None, config: dict | None = None):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"a teacher needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.module = module
        if module is not None:
            module.eval().requires_grad_(False)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.path = path
        self.config = config  # the teacher's run config (None for analytic teachers)

    def denoise(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        raise NotImplementedError

    def to(self, device) -> "Teacher":
        if self.module is not None:
            self.module.to(device)
        return self

    @property
    def device(self) -> torch.device | None:
        if self.module is None:
            return None
        tensor = next(iter(self.module.parameters()), None)
        return tensor.device if tensor is not None else None

    def __deepcopy__(self, memo):
        # Shared, never copied: the EMA callback deep-copies the whole student, and a frozen teacher
        # copied along would only double its memory.
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma in [{self.sigma_min:.4g}, {self.sigma_max:.4g}], path={self.path})"


def _batch_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or have shape ({x.shape[0]},), got {tuple(sigma.shape)}")
    return sigma


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


class FunctionTeacher(Teacher):
    """Any denoise_fn(x, sigma (B,), cond) -> D as a teacher: analytic models in tests and notebooks."""

    kind = "function"

    def __init__(self, denoise_fn: Callable, sigma_min: float, sigma_max: float):
        super().__init__(None, sigma_min, sigma_max)
        self.denoise_fn = denoise_fn

    def denoise(self, x, sigma, cond=None):
        return self.denoise_fn(x, _batch_sigma(sigma, x), cond)


class EDMTeacher(Teacher):
    kind = "edm"

    def __init__(self, module, path=None, config=None):
        # An EDM net sees every sigma of its log-normal training distribution; its sampling range is
        # the one it is known to be good on.
        super().__init__(module, module.sigma_min, module.sigma_max, path, config)

    def denoise(self, x, sigma, cond=None):
        return self.module.denoise(x, _batch_sigma(sigma, x).to(x.dtype), cond)


class VETeacher(Teacher):
    kind = "vesde"

    def __init__(self, module, path=None, config=None):
        sde = module.sde
        # Trained on t ~ U(eps, 1): sigma(eps) .. sigma(1) = sigma_max.
        lo = sde.sigma_min * math.exp(module.eps * sde.log_ratio)
        super().__init__(module, lo, sde.sigma_max, path, config)

    def denoise(self, x, sigma, cond=None):
        sigma = _batch_sigma(sigma, x).double()
        sde = self.module.sde
        t = torch.log(sigma / sde.sigma_min) / sde.log_ratio
        score = self.module.score(x, t.to(x.dtype), cond)
        return x + _bcast(sigma**2, x) * score


class VPTeacher(Teacher):
    kind = "vpsde"

    def __init__(self, module, path=None, config=None):
        self._sde = module.sde
        lo, hi = (self.sigma_of_t(torch.tensor(t, dtype=torch.float64)).item() for t in (module.eps, module.sde.T))
        super().__init__(module, lo, hi, path, config)

    def sigma_of_t(self, t: torch.Tensor) -> torch.Tensor:
        # sigma = std / mean = sqrt(1 - e^-B) / e^(-B/2) = sqrt(e^B - 1), B = int_0^t beta
        return torch.expm1(self._sde.integral_beta(t)).sqrt()

    def t_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        # B(t) = beta_min t + (beta_max - beta_min) t^2 / 2 = log(1 + sigma^2); the root written as
        # 2B / (beta_min + sqrt(...)) does not cancel catastrophically at small B.
        b = torch.log1p(sigma**2)
        slope = self._sde.beta_max - self._sde.beta_min
        return 2 * b / (self._sde.beta_min + torch.sqrt(self._sde.beta_min**2 + 2 * slope * b))

    def denoise(self, x, sigma, cond=None):
        sigma = _batch_sigma(sigma, x).double()
        t = self.t_of_sigma(sigma)
        scale = torch.rsqrt(1 + sigma**2)  # sqrt(abar); the VP std is then sigma * scale
        score = self.module.score(x * _bcast(scale, x), t.to(x.dtype), cond)
        # eps = -std * score, D = x_VE - sigma * eps
        return x + _bcast(sigma**2 * scale, x) * score


class DDPMTeacher(Teacher):
    """A discrete-time DDPM queried at any sigma between its steps' noise levels.

    Choice: between two steps the fractional step index is interpolated linearly in
    log sigma and handed to the net as its (float) noise level, while the input
    scaling uses the exact abar = 1 / (1 + sigma^2) of the requested sigma. On the
    grid this is exactly the DDPM; between steps it relies on the net being smooth
    in its noise-level input (a sinusoidal embedding is), as DPM-Solver's wrapper of
    discrete models does. Rounding to the nearest step instead (EDM's iDDPM wrapper)
    would make the ODE step use a sigma up to half a step off, which at small t is
    a sizeable fraction of sigma (sigma_0 = 0.010, sigma_1 = 0.014 for the linear
    schedule).
    """

    kind = "ddpm"

    def __init__(self, module, path=None, config=None):
        schedule = module.schedule
        # The sigmas the net was trained at, from the very buffers q_sample uses.
        sigmas = schedule.sqrt_one_minus_alphas_cumprod.double() / schedule.sqrt_alphas_cumprod.double()
        if not (sigmas[1:] > sigmas[:-1]).all():
            raise ValueError("DDPM teacher: its noise levels sqrt((1 - abar) / abar) must increase with t")
        self._log_sigmas = sigmas.log().cpu()
        super().__init__(module, sigmas[0].item(), sigmas[-1].item(), path, config)

    def fractional_t(self, sigma: torch.Tensor) -> torch.Tensor:
        log_grid = self._log_sigmas.to(sigma.device)
        log_sigma = sigma.double().log().clamp(log_grid[0], log_grid[-1])
        hi = torch.searchsorted(log_grid, log_sigma).clamp(1, log_grid.numel() - 1)
        lo = hi - 1
        frac = (log_sigma - log_grid[lo]) / (log_grid[hi] - log_grid[lo])
        return lo.double() + frac

    def denoise(self, x, sigma, cond=None):
        sigma = _batch_sigma(sigma, x).double()
        t = self.fractional_t(sigma)
        scale = torch.rsqrt(1 + sigma**2)
        x_vp = x * _bcast(scale, x)
        # The net directly, not DDPM.eps: its x0 / v conversions index the schedule with an integer t.
        out = self.module.net(x_vp, t.float(), cond).to(x.dtype)
        prediction = self.module.prediction
        if prediction == "x0":
            return out
        if prediction == "v":
            # v = a eps - s x0 with a = scale, s = sigma * scale: x0 = a x_VP - s v
            return _bcast(scale, x) * x_vp - _bcast(sigma * scale, x) * out
        return x - _bcast(sigma, x) * out


def teacher_from_module(module, path: str | None = None, config: dict | None = None) -> Teacher:
    """Wrap an already-built module of this project (see the module docstring for what is accepted)."""
    from lightning_modules.ddpm import DDPM
    from lightning_modules.edm import EDM
    from lightning_modules.score_sde import ScoreSDE

    where = f" ({path})" if path else ""
    if isinstance(module, EDM):
        return EDMTeacher(module, path, config)
    if isinstance(module, ScoreSDE):
        if module.sde_name == "ve":
            return VETeacher(module, path, config)
        if module.sde_name == "vp":
            return VPTeacher(module, path, config)
        raise ConfigError(
            f"not a usable teacher{where}: a {module.sde_name!r} score SDE; its marginal std 1 - abar does not map "
            f"to x0 + sigma n, so it has no EDM-form denoiser here: {_USABLE_TEXT}"
        )
    if isinstance(module, DDPM):
        return DDPMTeacher(module, path, config)
    raise ConfigError(f"not a usable teacher{where}: {type(module).__name__} has no probability-flow ODE to distill: {_USABLE_TEXT}")


def method_name(model_cfg: dict) -> str:
    """The config name (edm, vesde, ...) a run's `model` section corresponds to, for messages."""
    target = str(model_cfg.get("_target_", ""))
    if target.endswith("score_sde.ScoreSDE"):
        return {"ve": "vesde", "vp": "vpsde", "subvp": "subvpsde"}.get(model_cfg.get("sde", "vp"), "score_sde")
    return {
        "edm.EDM": "edm", "ddpm.DDPM": "ddpm", "ncsn.NCSN": "ncsn", "bc_mse.BCMSE": "bc_mse",
        "consistency.ConsistencyModel": "consistency",
    }.get(".".join(target.split(".")[-2:]), target or "unknown")


def load_teacher(path: str | Path, data_shape, cond_dim: int | None = None, map_location="cpu") -> Teacher:
    """The teacher in checkpoint `path` (EMA weights), checked against the student's data_shape and cond_dim."""
    from lightning_modules.checkpoint import load_module, read_checkpoint

    ckpt = read_checkpoint(path)  # refuses files not written by this project's train.py
    meta = ckpt["difflab"]
    model_cfg = OmegaConf.to_container(OmegaConf.create(meta["config"]).model, resolve=True)
    name = method_name(model_cfg)
    if name not in USABLE:
        why = _WHY_NOT.get(name, "no EDM-form denoiser is known for it")
        raise ConfigError(f"not a usable teacher: {path} is a {name} checkpoint ({why}); {_USABLE_TEXT}")
    want, have = tuple(int(d) for d in data_shape), tuple(int(d) for d in meta["data_shape"])
    if want != have:
        raise ConfigError(f"teacher {path} was trained on data of shape {have}, the student's data have shape {want}: use a teacher trained on the same data")
    if cond_dim != meta["cond_dim"]:
        raise ConfigError(f"teacher {path} has cond_dim={meta['cond_dim']}, the student's data have cond_dim={cond_dim}: use a teacher trained on the same data")
    del ckpt
    module, _ = load_module(path, map_location=map_location)
    return teacher_from_module(module, str(path), meta["config"])
