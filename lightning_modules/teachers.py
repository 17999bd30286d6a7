"""Trained diffusion models of this project as teachers for consistency distillation: checkpoint picking only.

Consistency distillation (Song et al. 2023) integrates a teacher's probability-flow ODE in the VE form
x = x0 + sigma n, dx/dsigma = (x - D(x; sigma)) / sigma. Every diffusion-family method already exposes that
`denoise(x, sigma, cond)` and its `sigma_range` (lightning_modules.base), so a teacher is any such module:
edm, vesde, vpsde, subvpsde, ddpm, ncsn, flow_matching. Refused: bc_mse (no denoiser) and consistency models
(already distilled; their output is a trajectory's end, not E[x0 | x]).

A teacher is frozen (eval mode, no gradients) and deliberately not an nn.Module: assigned to the student it
stays out of the student's module tree, its state_dict and its checkpoints, and the EMA callback never
averages it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf

from difflab.errors import ConfigError

USABLE = ("edm", "vesde", "vpsde", "subvpsde", "ddpm", "scheduled_sampling", "ncsn", "flow_matching")
_USABLE_TEXT = "use a checkpoint of edm, vesde, vpsde, subvpsde, ddpm, ncsn or flow_matching"
_WHY_NOT = {
    "bc_mse": "a regression policy has no denoiser",
    "lstm_gmm": "a mixture-density policy has no denoiser",
    "bet": "a bin-and-offset policy has no denoiser",
    "vae_policy": "a VAE policy has no denoiser",
    "consistency": "already a one-step model; distill from its own teacher instead",
    "consistency_training": "already a one-step model, with no denoiser; train a diffusion teacher instead",
    "consistency_tuning": "already a one-step model, with no denoiser; use the model it was tuned from",
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


class FunctionTeacher(Teacher):
    """Any denoise_fn(x, sigma (B,), cond) -> D as a teacher: analytic models in tests and notebooks."""

    kind = "function"

    def __init__(self, denoise_fn: Callable, sigma_min: float, sigma_max: float):
        super().__init__(None, sigma_min, sigma_max)
        self.denoise_fn = denoise_fn

    def denoise(self, x, sigma, cond=None):
        return self.denoise_fn(x, _batch_sigma(sigma, x), cond)


class ModuleTeacher(Teacher):
    """A trained method of this project: its own VE-form `denoise` on the sigma range it was trained on."""

    def __init__(self, module, kind: str, path=None, config=None):
        lo, hi = module.sigma_range
        super().__init__(module, lo, hi, path, config)
        self.kind = kind

    def denoise(self, x, sigma, cond=None):
        # An observation dict (camera images) goes through the TEACHER's own encoder, trained with its net: the
        # student's encoding of the same pictures would mean nothing to it.
        return self.module.denoise(x, _batch_sigma(sigma, x), self.module.encode_cond(cond))


def teacher_from_module(module, path: str | None = None, config: dict | None = None) -> Teacher:
    """Wrap an already-built module of this project: any method with a denoiser."""
    import samplers

    name = method_name({"_target_": f"{type(module).__module__}.{type(module).__qualname__}",
                        "sde": getattr(module, "sde_name", "vp")})
    if getattr(module, "provides", None) != samplers.DENOISER:
        why = _WHY_NOT.get(name, "it has no denoiser")
        raise ConfigError(f"not a usable teacher{f' ({path})' if path else ''}: a {name} model ({why}); {_USABLE_TEXT}")
    return ModuleTeacher(module, name, path, config)


def method_name(model_cfg: dict) -> str:
    """The config name (edm, vesde, ...) a run's `model` section corresponds to, for messages."""
    target = str(model_cfg.get("_target_", ""))
    if target.endswith("score_sde.ScoreSDE"):
        return {"ve": "vesde", "vp": "vpsde", "subvp": "subvpsde"}.get(model_cfg.get("sde", "vp"), "score_sde")
    return {
        "edm.EDM": "edm", "ddpm.DDPM": "ddpm", "ncsn.NCSN": "ncsn", "bc_mse.BCMSE": "bc_mse",
        "lstm_gmm.LSTMGMM": "lstm_gmm", "bet.BET": "bet", "vae_policy.VAEPolicy": "vae_policy",
        "consistency.ConsistencyModel": "consistency", "consistency_distillation.ConsistencyDistillation": "consistency",
        "consistency_training.ConsistencyTraining": "consistency_training",
        "consistency_tuning.ConsistencyTuning": "consistency_tuning", "flow_matching.FlowMatching": "flow_matching",
        "scheduled_sampling.ScheduledSamplingDDPM": "scheduled_sampling",
    }.get(".".join(target.split(".")[-2:]), target or "unknown")


def load_teacher(path: str | Path, data_shape, cond_dim: int | None = None, map_location="cpu", obs_spec: dict | None = None) -> Teacher:
    """The teacher in checkpoint `path` (EMA weights), checked against the student's data_shape, cond_dim and
    observations (`obs_spec`: the camera keys and sizes the datamodule gives, None for state-only data)."""
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
    theirs = meta.get("obs_spec")
    if _plain(theirs) != _plain(obs_spec):
        seen = lambda spec: f"camera images {spec['image_shapes']}, {spec['n_obs_steps']} observation steps" if spec else "the state only"  # noqa: E731
        raise ConfigError(f"teacher {path} saw {seen(theirs)}, the student's data give {seen(obs_spec)}: use a teacher trained on "
                          "the same observations (data.obs_keys, data.n_obs_steps)")
    if cond_dim != meta["cond_dim"]:
        raise ConfigError(f"teacher {path} has cond_dim={meta['cond_dim']}, the student's data have cond_dim={cond_dim}: use a teacher trained on the same data")
    del ckpt
    module, _ = load_module(path, map_location=map_location)
    return teacher_from_module(module, str(path), meta["config"])


def _plain(spec):
    """An obs_spec as plain JSON types, so tuples from a datamodule compare equal to lists from a checkpoint."""
    return json.loads(json.dumps(spec))
