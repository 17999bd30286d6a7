"""Build a method from a config, and rebuild it from a checkpoint alone (EMA weights)."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import torch
import samplers
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from difflab.errors import CheckpointError, ConfigError, MissingFileError
from lightning_modules.base import DiffusionModule


def sampling_options(cfg: DictConfig) -> dict:
    """The sampler options of a sample/evaluate call (its `options` dict, which the command line's `key=value`
    pairs fill), as keyword arguments of `module.sample`; null means "the model's own"."""
    options = cfg.get("options") or {}
    return {str(k): (OmegaConf.to_container(v) if OmegaConf.is_config(v) else v) for k, v in options.items() if v is not None}


def sampling_tag(cfg: DictConfig) -> str:
    """A file-name suffix for the options set (e.g. '_ddim_spacing-quadratic'), so that default output names of runs
    with different options do not overwrite each other."""
    return "".join(f"_{k}-{v}" for k, v in sampling_options(cfg).items())


# Runs before consistency distillation and training became two classes saved one class with a `mode`.
LEGACY_CONSISTENCY = "lightning_modules.consistency.ConsistencyModel"
CONSISTENCY_BY_MODE = {"distill": "lightning_modules.consistency_distillation.ConsistencyDistillation",
                       "train": "lightning_modules.consistency_training.ConsistencyTraining"}


def constructor_settings(cls) -> set[str]:
    """The settings a method class takes: its own constructor's and those it passes on to its bases'."""
    accepted = {"_target_", "_partial_"}
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            accepted |= set(inspect.signature(klass.__init__).parameters)
    return accepted


def sampling_block(cfg: DictConfig) -> DictConfig:
    """cfg with the flat sampler settings of a config from before the sampling block (model.sampler, sample_steps,
    eta, s_churn, ...) moved into model.sampling = {sampler, steps, options} (a copy), so such checkpoints build, sample
    and resume as they did."""
    try:
        cls = get_class(cfg.model._target_)
    except Exception:  # not a class of this code: instantiating it reports that
        return cfg
    accepted = constructor_settings(cls)
    renames = getattr(cls, "legacy_sampling", {})
    option_names = set().union(*(s.options for s in samplers.SAMPLERS.values())) | set(cls.default_sampling["options"])
    moved = [k for k in cfg.model if k not in accepted and (k in renames or k in option_names)]
    if not moved:
        return cfg
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        block = cfg.model.get("sampling") or {}
        block = OmegaConf.to_container(block) if OmegaConf.is_config(block) else dict(block)
        block.setdefault("options", {})
        for key in moved:
            value = cfg.model.pop(key)
            target = renames.get(key, key)
            if target in ("sampler", "steps"):
                block.setdefault(target, value)
            else:
                block["options"].setdefault(target, value)
        cfg.model.sampling = block
    return cfg


def current_config(cfg: DictConfig) -> DictConfig:
    """cfg in today's form (a copy where it changes): flat sampler settings moved into the sampling block, and a
    legacy consistency `model` section rewritten to the class its `mode` named (the keys the other mode used are
    dropped), so checkpoints of earlier versions load and resume."""
    if cfg.get("model") is None or cfg.model.get("_target_") is None:
        return cfg
    cfg = sampling_block(cfg)
    if cfg.model.get("_target_") != LEGACY_CONSISTENCY:
        return cfg
    cfg = copy.deepcopy(cfg)
    target = CONSISTENCY_BY_MODE[cfg.model.get("mode", "distill")]
    accepted = constructor_settings(get_class(target))
    with open_dict(cfg):
        cfg.model._target_ = target
        for key in [k for k in cfg.model if k not in accepted]:
            del cfg.model[key]
    return cfg


def build_obs_encoder(cfg: DictConfig, obs_spec: dict | None):
    """The observation encoder (cfg.obs_encoder) for data with camera images (the datamodule's `obs_spec`), or None."""
    if not obs_spec or not obs_spec.get("image_shapes"):
        return None
    if cfg.get("obs_encoder") is None:
        raise ConfigError(f"the data has camera images {sorted(obs_spec['image_shapes'])} but no observation encoder is "
                          "configured: add obs_encoder=resnet18 (Diffusion Policy's) or obs_encoder=conv_small (CPU-sized)")
    return instantiate(cfg.obs_encoder, image_shapes={k: list(v) for k, v in obs_spec["image_shapes"].items()},
                       low_dim=int(obs_spec["low_dim"]), n_obs_steps=int(obs_spec["n_obs_steps"]))


def method_settings(cfg: DictConfig) -> tuple[DictConfig, float]:
    """(cfg.model without cond_drop, cond_drop): model.cond_drop belongs to the shared base (condition dropout and its
    learned null condition), not to a method's constructor, so it is taken out before the method is instantiated and
    applied to whichever method is built."""
    method = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))
    return method, float(method.pop("cond_drop", None) or 0.0)


def build_model(cfg: DictConfig, data_shape, cond_dim, obs_spec: dict | None = None) -> DiffusionModule:
    """The net from cfg.net and the method from cfg.model, both sized by the datamodule. With camera images
    (`obs_spec`) the observation encoder is built first and its output size is the method's cond_dim."""
    cfg = current_config(cfg)
    data_shape = tuple(int(d) for d in data_shape)
    encoder = build_obs_encoder(cfg, obs_spec)
    if encoder is not None:
        cond_dim = encoder.out_dim
    # A method whose architecture is part of it (an LSTM with a mixture head, BET's GPT with bin heads) builds its own
    # net from model.*; the net group does not apply to it.
    method, cond_drop = method_settings(cfg)
    if getattr(get_class(method._target_), "owns_net", False):
        model = instantiate(method, net=None, data_shape=data_shape, cond_dim=cond_dim)
    else:
        net = instantiate(cfg.net, data_shape=data_shape, cond_dim=get_class(method._target_).net_cond_dim(cond_dim))
        model = instantiate(method, net=net, data_shape=data_shape, cond_dim=cond_dim)
    model.enable_cond_drop(cond_drop)
    if encoder is not None:
        model.obs_encoder, model.obs_spec = encoder, obs_spec
    return model


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path).expanduser()
    if path.is_dir():
        raise MissingFileError(f"ckpt_path={path} is a directory: pass a .ckpt file in it, e.g. {path / 'checkpoints' / 'last.ckpt'}"
                               if (path / "checkpoints").is_dir() else f"ckpt_path={path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise MissingFileError(f"checkpoint {path} does not exist (runs save theirs under logs/train/<run>/checkpoints/)")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is not a readable checkpoint: it is empty (0 bytes, an interrupted copy or save); "
                              "use another checkpoint of the run (its best_*.ckpt) or retrain")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, a pickle of other objects, a text file, ...
        why = " ".join(str(err).split())
        why = why.split(" Weights only load failed")[0].split(". Check the documentation")[0][:200]
        raise CheckpointError(f"{path} is not a readable checkpoint ({size} bytes): {type(err).__name__}: {why}. "
                              "It may be truncated or not a torch checkpoint; use another checkpoint of the run") from None
    if not isinstance(ckpt, dict) or "difflab" not in ckpt or not ckpt["difflab"].get("config"):
        raise CheckpointError(
            f"{path} was not written by this project's train.py (it has no 'difflab' entry with the run config); "
            "train with `python train.py ...` and use the .ckpt it saves"
        )
    return ckpt


def _data_name(config) -> str:
    target = str(config.get("_target_", "?")).rsplit(".", 1)[-1]
    return target.replace("DataModule", "").lower() or "?"


# model.* settings a resumed run may change: how it optimizes and how it samples. Every other model setting (the
# schedule, the number of levels, the parametrization, sigma ranges, the loss) is part of what the weights mean.
RESUME_SAFE_PREFIXES = ("optimizer", "scheduler", "sampling")
RESUME_SAFE_KEYS = frozenset({"clip_denoised", "predictor", "corrector", "ode_solver", "denoise", "sample_eps", "total_steps"})


def flat_settings(section, prefix: str = "") -> dict:
    """A nested settings dict as {'a.b.c': value}."""
    out = {}
    for key, value in (section or {}).items():
        if isinstance(value, dict):
            out.update(flat_settings(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_model_settings(saved: DictConfig, cfg: DictConfig, path: str | Path) -> None:
    """Refuse a resume whose model.* settings change what the saved weights mean (model.schedule, num_timesteps,
    prediction, ...); optimizer, scheduler and sampling settings may change."""
    then = flat_settings(OmegaConf.to_container(current_config(saved).model, resolve=True))
    now = flat_settings(OmegaConf.to_container(current_config(cfg).model, resolve=True))
    # Keys on one side only are settings of another version of the code (renamed or added since): the class's
    # default applies to them, as it did when the checkpoint loads for sampling.
    for key in sorted(set(then) & set(now)):
        if key.split(".")[0] in RESUME_SAFE_PREFIXES or key in RESUME_SAFE_KEYS or key.startswith("_"):
            continue
        a, b = then[key], now[key]
        if a != b:
            raise CheckpointError(f"checkpoint {path} was trained with model.{key}={a}, this run has model.{key}={b}: "
                                  f"that changes what the saved weights mean, so it cannot be resumed; pass model.{key}={a} "
                                  "(only optimizer, scheduler and sampling settings may change on resume), or start a "
                                  "new run")


def check_compatible(ckpt: dict, cfg: DictConfig, path: str | Path) -> None:
    """Refuse to resume a run of other data, another method or net with a clear message instead of a state_dict
    error. Data first: a data config also picks the net (data=toy2d switches to the MLP), so a missing data=
    would otherwise be blamed on net=."""
    saved = current_config(OmegaConf.create(ckpt["difflab"]["config"]))
    if saved.get("data") is not None and cfg.data.get("_target_") != saved.data.get("_target_"):
        raise CheckpointError(f"checkpoint {path} was trained on data={_data_name(saved.data)} ({saved.data.get('_target_')}), "
                              f"this run's config has data={_data_name(cfg.data)}: pass data={_data_name(saved.data)} "
                              "(and the other settings of the original run) to resume it")
    for group in ("model", "net"):
        want, have = cfg[group].get("_target_"), saved[group].get("_target_")
        if want != have:
            raise CheckpointError(
                f"checkpoint {path} is a {group} '{have}', but this run's config builds '{want}': "
                f"pass the same {group}=... the checkpoint was trained with"
            )
    net_now = OmegaConf.to_container(cfg.net, resolve=True)
    net_then = OmegaConf.to_container(saved.net, resolve=True)
    if net_now != net_then:
        differ = sorted(k for k in set(net_now) | set(net_then) if net_now.get(k) != net_then.get(k))
        raise CheckpointError(f"checkpoint {path} has net settings {net_then}, this run has {net_now} (they differ in "
                              f"{', '.join(f'net.{k}' for k in differ)}): use the same net.* values")
    check_model_settings(saved, cfg, path)


def load_module(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[DiffusionModule, dict]:
    """The method with its EMA weights (Lightning's WeightAveraging saves the average as `state_dict`)."""
    ckpt = read_checkpoint(path)
    meta = ckpt["difflab"]
    cfg = OmegaConf.create(meta["config"])
    model = build_model(cfg, meta["data_shape"], meta["cond_dim"], meta.get("obs_spec"))
    model.load_state_dict(ckpt["state_dict"])
    model.run_config = meta["config"]
    return model.to(map_location).eval(), ckpt


def instantiate_datamodule(config: dict):
    """The run's datamodule (not set up: unnormalize/render need no data on disk for images and toys)."""
    return instantiate(OmegaConf.create(config)["data"])


def load_guide(path: str | Path, module: DiffusionModule, map_location="cpu") -> DiffusionModule:
    """Autoguidance's guide (guide_ckpt=): a checkpoint of the same data as `module`, refused in one line otherwise."""
    guide, _ = load_module(path, map_location)
    ours, theirs = (module.run_config or {}).get("data", {}), (guide.run_config or {}).get("data", {})
    if ours.get("_target_") != theirs.get("_target_") or ours.get("labels") != theirs.get("labels"):
        raise CheckpointError(f"guide_ckpt={path} was trained on data={_data_name(theirs)} (labels={theirs.get('labels')}), "
                              f"this checkpoint on data={_data_name(ours)} (labels={ours.get('labels')}): autoguidance needs a "
                              "weaker model of the same data")
    return guide
