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
from difflab.errors import CheckpointError, ConfigError, MissingFileError

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


FORMATS = ("difflab", "lerobot")


def export_policy(policy, folder: str | Path, format: str = "difflab", features: dict | None = None) -> Path:
    """Write `policy` (an envs.policy.Policy) to `folder`; an earlier export there is replaced, a file or a folder of
    other files is refused. format='lerobot' writes what LeRobot's DiffusionPolicy.from_pretrained loads (state-based
    DDPM policies; envs/export_lerobot.py), `features` mapping our observation keys to its feature names."""
    from safetensors.torch import save_file

    module = policy.module
    if format not in FORMATS:
        raise ConfigError(f"format={format!r}: use one of {FORMATS}")
    if not module.run_config:
        raise ValueError("the policy's model has no run config (it was not built by train.py or load_policy): nothing to rebuild it from")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"cannot export the policy to {folder}: it is a file; name a folder (it is created)")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "config.json").is_file():
        raise ConfigError(f"cannot export the policy to {folder}: it is a folder with other files in it, which exporting "
                          "would replace; name a new folder (or an earlier export, which is replaced)")
    if format == "lerobot":
        from envs.export_lerobot import export_lerobot

        return export_lerobot(policy, folder, features)
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


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}): it may be cut short or edited; export the policy again") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a {type(value).__name__}, not the exported settings; export the policy again")
    return value


def _check_shapes(built: dict, stored: dict, folder: Path) -> None:
    """model.safetensors must fit the model config.json builds; a mismatch means one of them was edited."""
    for name in sorted(set(built) | set(stored)):
        want = tuple(built[name].shape) if name in built else None
        have = tuple(stored[name].shape) if name in stored else None
        if want != have:
            raise CheckpointError(f"{folder}: config.json builds a model whose {name} is {want or 'absent'}, but model.safetensors "
                                  f"holds {have or 'none'}: config.json (its data_shape, cond_dim or build.net settings) or the "
                                  "weights were changed after export; export the policy again")


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
    config = _read_json(folder / "config.json")
    if config.get("format") != FORMAT or int(config.get("version", 0)) > VERSION:
        raise CheckpointError(f"{folder}/config.json is format {config.get('format')!r} version {config.get('version')}; "
                              f"this code reads {FORMAT!r} up to version {VERSION}")
    build = OmegaConf.create({k: v for k, v in config["build"].items() if v is not None})
    module = build_model(build, config["data_shape"], config["cond_dim"], config.get("obs_spec"))
    try:
        weights = load_file(str(folder / "model.safetensors"))
    except Exception as err:  # safetensors' own errors: a header cut short, a file that is not safetensors
        raise CheckpointError(f"{folder / 'model.safetensors'} is not readable ({type(err).__name__}: {' '.join(str(err).split())[:160]}): "
                              "it may be truncated; export the policy again") from None
    _check_shapes(module.state_dict(), weights, folder)
    module.load_state_dict(weights)
    module.run_config = config["build"]
    module = module.to(device).eval()
    spec = _read_json(folder / "policy.json")
    for key in ("obs_normalizer", "action_normalizer"):
        spec[key] = {k: torch.tensor(v, dtype=torch.float32) for k, v in spec[key].items()}
    return Policy.from_spec(module, spec, sampler=config["sampler"], steps=config["steps"],
                            seed=config["seed"] if seed is None else seed, sample_kwargs=config["sample_kwargs"])


def main(argv: list[str] | None = None) -> Path:
    """python -m envs.export CKPT FOLDER [--format lerobot] [--sampler ancestral] [--steps N] [--option variance=posterior]"""
    import argparse

    from difflab.cli import print_error
    from difflab.errors import DifflabError
    from envs.policy import load_policy

    parser = argparse.ArgumentParser(prog="python -m envs.export", description="Export a policy checkpoint as a folder: "
                                     "ours (safetensors + JSON, envs.export.load_exported) or LeRobot's (DiffusionPolicy.from_pretrained).")
    parser.add_argument("ckpt_path", help="a policy checkpoint written by train.py")
    parser.add_argument("folder", help="the folder to write (an earlier export there is replaced)")
    parser.add_argument("--format", choices=FORMATS, default="difflab")
    parser.add_argument("--sampler", default=None, help="the sampler the exported policy acts with (default: the model's)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a sampler option, e.g. variance=posterior, ddim_spacing=leading, eta=0 (repeatable)")
    args = parser.parse_args(argv)
    options = {}
    for item in args.option:
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    try:
        policy, _ = load_policy(args.ckpt_path, args.sampler, args.steps, **options)
        folder = export_policy(policy, args.folder, format=args.format)
    except DifflabError as err:
        print_error(err)
        raise SystemExit(err.exit_code) from None
    print(f"exported {args.ckpt_path} ({args.format}) -> {folder}")
    return folder


if __name__ == "__main__":
    main()
