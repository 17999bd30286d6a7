"""The LR schedules' values at named steps, against their definitions (Ho et al.'s linear warm-up; Diffusion
Policy's warm-up then cosine to min_ratio), through the optimizer as Lightning steps them (once per optimizer step)."""

import math

import pytest
import torch

from lightning_modules.lr_schedules import warmup_constant, warmup_cosine


def lrs(make, steps: int, base: float = 0.1) -> list[float]:
    """The learning rate used by optimizer steps 0, 1, ..., steps - 1."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_constant_rises_linearly_then_holds():
    got = lrs(lambda o: warmup_constant(o, warmup_steps=4), 7)
    assert got == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.1], abs=1e-12)
    assert lrs(lambda o: warmup_constant(o, warmup_steps=0), 2) == pytest.approx([0.1, 0.1])


def test_warmup_cosine_warms_up_then_follows_half_a_cosine_to_the_floor():
    warm, total, floor = 2, 10, 0.1
    got = lrs(lambda o: warmup_cosine(o, warmup_steps=warm, total_steps=total, min_ratio=floor), 13)
    want = [0.1 * (s + 1) / warm for s in range(warm)]
    want += [0.1 * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / (total - warm))))) for s in range(warm, 13)]
    assert got == pytest.approx(want, abs=1e-12)
    assert got[warm] == pytest.approx(0.1) and got[6] == pytest.approx(0.1 * (floor + (1 - floor) * 0.5))
    assert got[total:] == pytest.approx([0.1 * floor] * 3)  # held at the floor after total_steps
