"""A policy as a folder, LeRobot-style: weights as safetensors, the model's config and the normaliser stats as JSON.

    export_policy(policy, "exported/pusht_dp")     # after load_policy(checkpoint)
    policy = load_exported("exported/pusht_dp")    # no checkpoint, no run directory, no Hydra composition
    policy.reset(); action = policy.select_action(obs)

`model.safetensors` holds the module's weights (the EMA average a checkpoint loads as); `config.json` the resolved
model / net / observation-encoder settings with the shapes that size them, and the sampler the policy acts with;
`policy.json` what the policy needs around the model (normaliser low/high, observation keys and cameras, horizons,
task). The folder is written next to its destination and renamed into place, so a crash never leaves half of one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from difflab.atomic_dir import atomic_dir
from difflab.errors import CheckpointError, MissingFileError

FORMAT = "difflab-policy"
VERSION = 1
FILES = ("model.safetensors", "config.json", "policy.json")


def _to_json(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


def export_policy(policy, folder: str | Path) -> Path:
    """Write `policy` (an envs.policy.Policy) to `folder` (replaced if it exists)."""
    from safetensors.torch import save_file

    module = policy.module
    if not module.run_config:
        raise ValueError("the policy's model has no run config (it was not built by train.py or load_policy): nothing to rebuild it from")
    folder = Path(folder)
    config = {
        "format": FORMAT, "version": VERSION,
        "method": f"{type(module).__module__}.{type(module).__qualname__}",
        # what build_model reads, resolved (no interpolation left to the training config)
        "build": {k: module.run_config.get(k) for k in ("model", "net", "obs_encoder")},
        "data_shape": list(module.data_shape), "cond_dim": module.cond_dim, "obs_spec": module.obs_spec,
        "sampler": policy.sampler, "steps": policy.steps, "sample_kwargs": policy.sample_kwargs, "seed": policy.seed,
    }
    # safetensors refuses tensors that share memory: store independent contiguous copies
    weights = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    with atomic_dir(folder) as tmp:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        (tmp / "config.json").write_text(json.dumps(_to_json(config), indent=2))
        (tmp / "policy.json").write_text(json.dumps(_to_json(policy.spec()), indent=2))
    return folder


def load_exported(folder: str | Path, device: str = "cpu", seed: int | None = None):
    """The Policy in `folder` (written by export_policy), on `device`; seed replaces the exported sampling seed."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from envs.policy import Policy
    from lightning_modules.checkpoint import build_model

    folder = Path(folder)
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise MissingFileError(f"{folder} is not an exported policy: it lacks {', '.join(missing)} (write one with envs.export.export_policy)")
    config = json.loads((folder / "config.json").read_text())
    if config.get("format") != FORMAT or int(config.get("version", 0)) > VERSION:
        raise CheckpointError(f"{folder}/config.json is format {config.get('format')!r} version {config.get('version')}; "
                              f"this code reads {FORMAT!r} up to version {VERSION}")
    build = OmegaConf.create({k: v for k, v in config["build"].items() if v is not None})
    module = build_model(build, config["data_shape"], config["cond_dim"], config.get("obs_spec"))
    module.load_state_dict(load_file(str(folder / "model.safetensors")))
    module.run_config = config["build"]
    module = module.to(device).eval()
    spec = json.loads((folder / "policy.json").read_text())
    for key in ("obs_normalizer", "action_normalizer"):
        spec[key] = {k: torch.tensor(v, dtype=torch.float32) for k, v in spec[key].items()}
    return Policy.from_spec(module, spec, sampler=config["sampler"], steps=config["steps"],
                            seed=config["seed"] if seed is None else seed, sample_kwargs=config["sample_kwargs"])
