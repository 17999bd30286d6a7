"""Learning-rate schedules stepped once per optimizer step (configs pass them as partials)."""

from __future__ import annotations

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _warmup_constant(step: int, warmup_steps: int) -> float:
    return min(1.0, (step + 1) / max(warmup_steps, 1))


def _warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    if step < warmup_steps:
        return (step + 1) / max(warmup_steps, 1)
    progress = min(1.0, (step - warmup_steps) / max(total_steps - warmup_steps, 1))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_constant(optimizer: Optimizer, warmup_steps: int = 5000) -> LambdaLR:
    """Linear warm-up to the base LR, then constant (Ho et al. 2020: 5000 steps)."""
    return LambdaLR(optimizer, partial(_warmup_constant, warmup_steps=warmup_steps))


def warmup_cosine(optimizer: Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up, then cosine decay to min_ratio * base LR at total_steps (Diffusion Policy's choice)."""
    return LambdaLR(optimizer, partial(_warmup_cosine, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=min_ratio))
