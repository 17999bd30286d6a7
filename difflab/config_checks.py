"""Types and ranges of the settings, checked when the config is read, so a bad value fails at start naming its key.

Rules are keyed by a setting's last name (`batch_size` covers `data.batch_size`, `callbacks.quality.batch_size`
and sample.py's `batch_size`), with a few full keys that mean something else where they sit. A method's own
constructor still checks what only it knows (a sigma range, a sampler name); these rules catch what would
otherwise fail deep inside torch or Lightning, or be silently replaced by a default (`steps=0`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from omegaconf import DictConfig, ListConfig, OmegaConf

from difflab.errors import ConfigError


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and not (isinstance(v, float) and math.isnan(v))


@dataclass(frozen=True)
class Rule:
    test: Callable[[Any], bool]
    wants: str  # completes "must be ..."
    optional: bool = False  # null allowed (the setting's default is "pick for me")

    def check(self, key: str, value) -> None:
        if value is None and self.optional:
            return
        if not self.test(value):
            shown = f"{value!r} ({type(value).__name__})" if isinstance(value, str) else repr(value)
            raise ConfigError(f"{key}={shown} is not valid: {key} must be {self.wants}{' or null' if self.optional else ''}")


def whole(low: int, optional: bool = False) -> Rule:
    return Rule(lambda v: _is_int(v) and v >= low, f"a whole number >= {low}", optional)


def number(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False, optional: bool = False) -> Rule:
    def test(v) -> bool:
        if not _is_number(v):
            return False
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    left, right = ("(" if low_open else "["), (")" if high_open else "]")
    wants = f"a number > {low:g}" if high == math.inf and low_open else f"a number >= {low:g}" if high == math.inf else f"a number in {left}{low:g}, {high:g}{right}"
    return Rule(test, wants, optional)


POSITIVE, OPTIONAL_POSITIVE = whole(1), whole(1, optional=True)
COUNT, OPTIONAL_COUNT = whole(0), whole(0, optional=True)
POSITIVE_REAL = number(0, low_open=True)
PROBABILITY = number(0, 1)

# By a setting's last name, wherever it sits.
RULES: dict[str, Rule] = {
    **dict.fromkeys(["batch_size", "num_timesteps", "num_scales", "num_episodes", "num_train", "num_val",
                     "horizon", "n_obs_steps", "ssm_projections", "ch", "hidden", "depth", "emb_dim", "step_embed_dim",
                     "n_groups", "kernel_size", "s0", "s1", "log_every_n_steps", "accumulate_grad_batches", "num_nodes",
                     "resolution", "crop_size", "n_steps_each", "n_steps"], POSITIVE),
    **dict.fromkeys(["steps", "total_steps", "n_action_steps", "max_steps", "num_samples"], OPTIONAL_POSITIVE),
    **dict.fromkeys(["num_workers", "every_n_val", "max_rollback", "time_shift_cutoff", "warmup_steps", "num_res_blocks",
                     "val_size", "n_corrector_steps", "refresh_rate", "first_seed", "seed", "split_seed"], COUNT),
    "time_shift_window": OPTIONAL_COUNT,
    **dict.fromkeys(["lr", "sigma_min", "sigma_max", "sigma_data", "snr", "step_lr", "step_size", "rtol", "atol",
                     "rho", "p_std", "logit_std"], POSITIVE_REAL),
    "eps_scale": number(0, low_open=True, optional=True),
    "huber_c": number(0, low_open=True, optional=True),
    "eta": number(0, optional=True),
    **dict.fromkeys(["weight_decay", "input_perturbation", "s_churn"], number(0)),
    "gradient_clip_val": number(0, optional=True),
    **dict.fromkeys(["beta_start", "beta_end"], number(0, 1, low_open=True, high_open=True)),
    **dict.fromkeys(["p_start", "p_end"], PROBABILITY),
    **dict.fromkeys(["val_fraction", "dropout", "decay"], number(0, 1, high_open=True)),
    "mu": number(0, 1, high_open=True, optional=True),
    "save_top_k": whole(-1),
    "num_sanity_val_steps": whole(-1),
}

# Full keys whose meaning differs from the name's elsewhere.
KEY_RULES: dict[str, Rule] = {
    "trainer.max_steps": whole(-1),  # -1: bounded by trainer.max_epochs instead (checked below)
    "trainer.max_epochs": whole(-1, optional=True),
    "trainer.val_check_interval": Rule(lambda v: (_is_int(v) and v >= 1) or (isinstance(v, float) and 0 < v <= 1),
                                       "a whole number of steps >= 1 or a fraction of an epoch in (0, 1]", optional=True),
    "data.labels": Rule(lambda v: isinstance(v, (bool, str)), "true or false (for data=celeba also one attribute's name, "
                        "e.g. Smiling)", optional=True),  # null: false; which data take which value: check_data_labels
    "model.cond_drop": number(0, 1, high_open=True, optional=True),
    "final_eval.num_episodes": COUNT,  # 0: no closed-loop evaluation at the end (a dataset without a simulator)
    "speed.cpu_threads": Rule(lambda v: v == "auto" or (_is_int(v) and v >= 1), "auto or a whole number >= 1"),
    "model.eps": number(0, 1, low_open=True, high_open=True),
    "model.sample_eps": number(0, 1, low_open=True, high_open=True),
    "model.t_min": number(0, 1, low_open=True, high_open=True),
    "model.t_max": number(0, 1, low_open=True, high_open=True),
}

SAMPLER_OPTIONS = "options"  # sample.py's and evaluate.py's dict of sampler options (difflab.cli.forward_sampler_options)

# What must be given where null would crash: sample.py draws exactly num_samples.
ENTRY_RULES: dict[str, dict[str, Rule]] = {
    "sample": {"num_samples": POSITIVE},
    "evaluate": {"max_steps": OPTIONAL_POSITIVE},
}


def _leaves(cfg: DictConfig, prefix: str = ""):
    """(full key, value) of every setting, resolved one at a time; unresolvable ones (Hydra's runtime
    interpolations outside a run) are skipped: they are paths, not numbers."""
    for key in cfg.keys():
        full = f"{prefix}{key}"
        if full == "hydra":
            continue
        if OmegaConf.is_missing(cfg, key):
            example = "logs/train/<run>/checkpoints/last.ckpt" if key == "ckpt_path" else "..."
            raise ConfigError(f"{full} is required: pass {full}={example}")
        try:
            value = cfg[key]
        except Exception:  # an interpolation that only resolves inside a Hydra run
            continue
        if isinstance(value, DictConfig):
            yield from _leaves(value, full + ".")
        elif not isinstance(value, ListConfig):
            yield full, value


def check_config(cfg: DictConfig, entry: str = "train") -> None:
    """Raise ConfigError naming the first setting whose type or range is wrong."""
    extra = ENTRY_RULES.get(entry, {})
    model = cfg.get("model")
    if isinstance(model, DictConfig) and "mode" in model:
        raise ConfigError(f"model.mode={model.get('mode')} is gone: consistency distillation and consistency training are two "
                          "methods now; use model=consistency (distillation, with model.teacher_ckpt=PATH) or "
                          "model=consistency_training (no teacher)")
    for key, value in _leaves(cfg):
        name = key.rsplit(".", 1)[-1]
        rule = KEY_RULES.get(key) or extra.get(key) or RULES.get(name)
        if rule is not None:  # a sampler option of sample.py / evaluate.py is shown as typed: eps_scale=, not options.eps_scale=
            rule.check(key.removeprefix(f"{SAMPLER_OPTIONS}.") if entry != "train" else key, value)
    check_data_labels(cfg)
    trainer = cfg.get("trainer")
    if entry == "train" and trainer is not None and not trainer.get("fast_dev_run"):
        max_steps, max_epochs = trainer.get("max_steps"), trainer.get("max_epochs")
        if max_steps == 0:
            raise ConfigError("trainer.max_steps=0 trains nothing, so the final figure would describe an untrained net: "
                              "set trainer.max_steps >= 1 (or trainer.fast_dev_run=true to check a config)")
        if max_steps == -1 and not (max_epochs and max_epochs >= 1):
            raise ConfigError("trainer.max_steps=-1 with trainer.max_epochs=-1 never stops: set trainer.max_steps >= 1 "
                              "or trainer.max_epochs >= 1")


def check_data_labels(cfg: DictConfig) -> None:
    """data.labels by data: true/false everywhere it exists (digits, cifar10, toy2d, celeba); an attribute name only
    for celeba, and one it has; true on a toy only for a mixture (a toy with components)."""
    data = cfg.get("data")
    if not isinstance(data, DictConfig) or data.get("labels") is None:  # null: false
        return
    labels, target = data.get("labels"), str(data.get("_target_") or "")
    name = target.rsplit(".", 2)[-2] if target.count(".") >= 2 else target  # datamodules.<name>.<Class>
    if name == "celeba":
        from datamodules.celeba import check_celeba_labels

        check_celeba_labels(labels)
    elif isinstance(labels, str):
        raise ConfigError(f"data.labels={labels!r} (str) is not valid: data.labels must be true or false for data={name}; an "
                          "attribute's name is for data=celeba only")
    elif name == "toy2d" and labels is True:
        from datamodules.toy2d import TOY_COMPONENTS, TOY_DISTRIBUTIONS, toy_labels_error

        if data.get("name") in TOY_DISTRIBUTIONS and data.get("name") not in TOY_COMPONENTS:  # an unknown name: its own line
            raise ConfigError(toy_labels_error(data.get("name")))


def check_known_keys(cfg: DictConfig, allowed: set[str], entry: str, hint: str = "") -> None:
    """sample.py and evaluate.py take their method from the checkpoint: a `model=` or `+model=...` group
    would be composed and then silently ignored, so refuse any top-level key they do not read."""
    refuse_unknown(cfg.keys(), allowed, entry, hint)


def refuse_unknown(keys, allowed: set[str], entry: str, hint: str = "") -> None:
    unknown = sorted(k for k in keys if k not in allowed and k != "hydra")
    if unknown:
        raise ConfigError(f"{entry}.py does not use {', '.join(repr(k) for k in unknown)}: the method and its settings come "
                          f"from the checkpoint. {hint}Its options are: {', '.join(sorted(allowed - {'paths'}))}")
