"""What train.py, sample.py and evaluate.py do around their work: one line for a known user error, and the
command that resumes an interrupted run."""

from __future__ import annotations

import functools
import os
import shlex
import sys
from pathlib import Path
from typing import Callable

from difflab.errors import DifflabError, user_error


def traceback_wanted(cfg=None) -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or bool(cfg is not None and cfg.get("debug"))


def print_error(err: DifflabError | str) -> None:
    text = " ".join(str(err).split())  # one line, whatever the message's own line breaks
    print(f"\nerror: {text}", file=sys.stderr, flush=True)  # on its own line, also after a progress bar


def one_line_errors(task: Callable) -> Callable:
    """Wrap a Hydra task: a DifflabError (also behind Hydra's InstantiationException) exits with one line on stderr
    and its exit code; anything else is a bug and keeps its traceback. `debug=true` or HYDRA_FULL_ERROR=1 shows
    the traceback of user errors too."""

    @functools.wraps(task)
    def wrapper(cfg):
        try:
            return task(cfg)
        except KeyboardInterrupt:
            if traceback_wanted(cfg):
                raise
            print_error("interrupted (Ctrl-C)")
            sys.exit(130)
        except Exception as exc:
            err = user_error(exc)
            if err is None or traceback_wanted(cfg):
                raise
            print_error(err)
            sys.exit(err.exit_code)

    return wrapper


def resume_command(ckpt_path: str | Path, run_dir: str | Path | None = None, script: str = "train.py") -> str:
    """This run's command line with ckpt_path= pointing at `ckpt_path` (Hydra's record of the overrides), in the
    same run directory, so TensorBoard shows one continuous run."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except Exception:  # not inside a Hydra run
        overrides = sys.argv[1:]
    kept = [o for o in overrides if not o.lstrip("+~").startswith(("ckpt_path=", "hydra.run.dir="))]
    extra = [f"ckpt_path={ckpt_path}"] + ([f"hydra.run.dir={run_dir}"] if run_dir else [])
    return " ".join(["python", script, *map(shlex.quote, kept + extra)])


def writable_dir(path: str | Path, setting: str) -> Path:
    """Create `path` if needed and prove it can be written, before minutes of sampling are spent on it."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        from difflab.errors import ConfigError

        raise ConfigError(f"{setting}: {path} cannot be written ({err.strerror or err}); pick a writable folder") from None
    return path


def entry_keys(config_name: str) -> set[str]:
    """The top-level settings an entry point's own config file declares (plus its `paths` group)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / f"{config_name}.yaml")
    return (set(cfg.keys()) - {"defaults", "hydra"}) | {"paths"}


def forward_sampler_options(entry: str) -> None:
    """Before Hydra composes sample.py's or evaluate.py's config: every `key=value` that is not one of the entry's own
    settings goes into its `options` dict (`s_churn=40` becomes `+options.s_churn=40`), and from there to the
    sampler. The method's `check_sampling` is the one check of what a sampler takes, so there is no list of options
    to keep here: a name no sampler of the method takes is refused there with the samplers that take it."""
    own = entry_keys(entry) | {"hydra"}
    for i, arg in enumerate(sys.argv[1:], start=1):
        key, sep, value = arg.partition("=")
        if sep and not arg.startswith("-") and key.isidentifier() and key not in own:
            sys.argv[i] = f"+options.{key}={value}"


def moved_sampling_key(arg: str) -> str | None:
    """The line for a `model.<sampler setting>=` override of the layout before the sampling block (model.sampler,
    model.sample_steps, model.eta, ...), or None: those settings now live in model.sampling."""
    import samplers
    from lightning_modules.ddpm import DDPM
    from lightning_modules.ncsn import NCSN

    key, sep, value = arg.lstrip("+~").partition("=")
    parts = key.split(".")
    if not sep or len(parts) != 2 or parts[0] != "model":
        return None
    name = parts[1]
    renames = NCSN.legacy_sampling
    options = set().union(*(s.options for s in samplers.SAMPLERS.values())) | set(DDPM.default_sampling["options"])
    if name in renames:
        new = renames[name]
        where = f"model.sampling.{new}" if new in ("sampler", "steps") else f"model.sampling.options.{new}"
    elif name in options:
        where = f"model.sampling.options.{name}"
    else:
        return None
    return f"{key} is now {where} (sampler settings live in the model's sampling block): pass {where}={value}"


def refuse_moved_sampling_keys() -> None:
    """Before Hydra composes train.py's config: an override of a sampler setting by its old place gets one line
    naming the new one, not Hydra's advice to add the key with +."""
    for arg in sys.argv[1:]:
        line = moved_sampling_key(arg) if not arg.startswith("-") else None
        if line is not None:
            print_error(line)
            sys.exit(2)


def refuse_training_groups(entry: str, hint: str = "") -> None:
    """Before Hydra composes sample.py's or evaluate.py's config: `model=ddpm` there would get Hydra's advice to
    write `+model=ddpm`, which is refused next. A training config group on the command line gets the project's
    own line (what the entry point takes) at once, exit 2."""
    from difflab.config_checks import refuse_unknown
    from difflab.errors import ConfigError

    configs = Path(__file__).resolve().parents[1] / "configs"
    groups = {p.name for p in configs.iterdir() if p.is_dir()} - {"hydra", "paths"}
    given = {a.split("=", 1)[0].lstrip("+~") for a in sys.argv[1:] if "=" in a and not a.startswith("-")}
    try:
        refuse_unknown({k for k in given if k in groups}, entry_keys(entry), entry, hint)
    except ConfigError as err:
        if traceback_wanted():
            raise
        print_error(err)
        sys.exit(err.exit_code)
    forward_sampler_options(entry)


def requested_labels(labels, num_samples: int, datamodule, path) -> tuple["torch.Tensor | None", int, dict]:
    """(labels per sample or None, how many samples, the grid layout) for sample.py's `labels=`: a class, a list of
    classes (cycled), `all` (one row per class) or null (every class in turn); refused in one line where it does not
    fit the checkpoint."""
    import math

    import torch

    from datamodules.base import balanced_labels
    from difflab.errors import ConfigError

    classes = getattr(datamodule, "num_classes", None) if getattr(datamodule, "cond_kind", None) == "labels" else None
    if classes is None:
        if labels is not None:
            raise ConfigError(f"labels={labels} is for a class-conditional checkpoint; {path} was trained without labels "
                              "(train one with data.labels=true)")
        return None, num_samples, {}
    if labels is None:
        return balanced_labels(num_samples, classes), num_samples, {}
    if labels == "all":
        per_class = math.ceil(num_samples / classes)
        return torch.arange(classes).repeat_interleave(per_class), per_class * classes, {"nrow": per_class}
    wanted = list(labels) if isinstance(labels, (list, tuple)) else [labels]
    if not wanted or not all(isinstance(c, int) and not isinstance(c, bool) for c in wanted):
        raise ConfigError(f"labels={labels} is not valid: a class number, a list of them ([0,1,2]) or all")
    bad = [c for c in wanted if not 0 <= c < classes]
    if bad:
        raise ConfigError(f"labels={labels}: {bad[0]} is out of range; this model's classes are 0..{classes - 1}")
    return torch.tensor(wanted)[torch.arange(num_samples) % len(wanted)], num_samples, {}
