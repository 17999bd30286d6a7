"""Simulation environments that policies are evaluated in, by task name.

A trajectory datamodule names its task (`task = "pusht"`); a policy carries that name in its checkpoint
entry, so `make_env(policy.task)` builds the environment without the data or the datamodule.
"""

from __future__ import annotations

import importlib

from difflab.errors import ConfigError

TASKS = {"obstacle2d": "envs.obstacle2d:Obstacle2DEnv", "pusht": "envs.pusht:PushTEnv"}


def make_env(task: str, render_size: int = 96):
    """A fresh environment of `task` (imported on first use: gym-pusht is needed for pusht only)."""
    if task not in TASKS:
        raise ConfigError(f"no environment for task {task!r}: the tasks are {', '.join(sorted(TASKS))}")
    module, cls = TASKS[task].split(":")
    return getattr(importlib.import_module(module), cls)(render_size=render_size)
