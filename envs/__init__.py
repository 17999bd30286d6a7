"""Simulation environments that policies are evaluated in, by task name.

A trajectory datamodule names its task (`task = "pusht"`); a policy carries that name in its checkpoint
entry, so `make_env(policy.task)` builds the environment without the data or the datamodule.
"""

from __future__ import annotations

import importlib
import inspect

from difflab.errors import ConfigError

TASKS = {"obstacle2d": "envs.obstacle2d:Obstacle2DEnv", "pusht": "envs.pusht:PushTEnv"}


def make_env(task: str, render_size: int = 96, cameras: bool = False, **options):
    """A fresh environment of `task` (imported on first use: gym-pusht is needed for pusht only); cameras=True adds
    its camera frames to every observation (for image policies); `options` are the environment's own settings
    (Push-T's `perturb`), refused in one line by an environment without them."""
    if task not in TASKS:
        raise ConfigError(f"no environment for task {task!r}: the tasks are {', '.join(sorted(TASKS))}")
    module, cls = TASKS[task].split(":")
    env_cls = getattr(importlib.import_module(module), cls)
    params = inspect.signature(env_cls).parameters
    unknown = sorted(k for k in options if k not in params)
    if unknown:
        raise ConfigError(f"the {task} environment has no setting {unknown[0]}= (it takes: "
                          f"{', '.join(k for k in params if k not in ('render_size', 'cameras')) or 'none'})")
    if cameras and "cameras" not in params:
        raise ConfigError(f"the {task} environment has no cameras: its policies observe state only")
    return env_cls(render_size=render_size, **({"cameras": True} if cameras else {}), **options)
