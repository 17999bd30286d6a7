"""Teachers for consistency distillation, beyond the unconditional checks of test_consistency.py: a conditional
teacher passes its cond through every conversion (a consistency policy distils a conditional diffusion policy),
the DDPM teacher's fractional step (DDPM.level_of) between and beyond its grid, and the bookkeeping a warm start reads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import ExactDDPMNet
from lightning_modules.analytic import GaussianMixture
from lightning_modules.ddpm import DDPM
from lightning_modules.edm import EDM
from lightning_modules.score_sde import ScoreSDE
from lightning_modules.sde import VESDE
from lightning_modules.teachers import FunctionTeacher, ModuleTeacher, Teacher, method_name, teacher_from_module

BASE = [[-2.0, 0.0], [2.0, 0.0], [0.0, 3.0]]


def mixture_for(cond: torch.Tensor) -> list[GaussianMixture]:
    """One mixture per row: the base modes shifted by that row's cond (a conditional data distribution)."""
    return [GaussianMixture(torch.tensor(BASE, dtype=torch.float64) + c.double(), [0.3, 0.5, 0.4], [0.2, 0.3, 0.5]) for c in cond]


def rowwise(fn, x, cond, *per_row):
    return torch.cat([fn(m, x[i : i + 1], *(p[i : i + 1] for p in per_row)) for i, m in enumerate(mixture_for(cond))])


def CondDDPMNet(schedule, prediction):
    """The exact eps (or x0 / v) of the mixture that `cond` selects, row by row."""
    return ExactDDPMNet(schedule, lambda x, a, s, cond: rowwise(lambda m, xr, ar, sr: m.score(xr, ar, sr), x, cond, a, s),
                        prediction)


class CondScoreNet(nn.Module):
    def __init__(self, sde):
        super().__init__()
        self.sde = sde

    def forward(self, x, level, cond=None):
        if isinstance(self.sde, VESDE):
            mean, std = torch.ones_like(level.double()), level.double().exp()
        else:
            mean, std = self.sde.marginal(level.double() / 999.0)
        score = rowwise(lambda m, xr, mr, sr: m.score(xr.double(), mr, sr), x, cond, mean, std)
        return (-std[:, None] * score).to(x.dtype)


class CondEDMNet(nn.Module):
    """F with c_skip x + c_out F(c_in x, c_noise) = the conditional mixture's denoiser."""

    def forward(self, x_in, c_noise, cond=None):
        sigma = (4 * c_noise.double()).exp()[:, None]
        total = sigma**2 + 0.25
        y = x_in.double() * total.sqrt()
        exact = rowwise(lambda m, yr, sr: m.denoiser(yr, 1.0, sr), y, cond, sigma[:, 0])
        return ((exact - 0.25 / total * y) / (sigma * 0.5 / total.sqrt())).to(x_in.dtype)


def conditional_teacher(kind: str):
    if kind.startswith("ddpm"):
        prediction = kind.split("-")[1]
        module = DDPM(nn.Identity(), None, data_shape=(2,), cond_dim=2, num_timesteps=1000, prediction=prediction)
        module.net = CondDDPMNet(module.schedule, prediction)
    elif kind == "edm":
        module = EDM(nn.Identity(), None, data_shape=(2,), cond_dim=2)
        module.net = CondEDMNet()
    else:
        module = ScoreSDE(nn.Identity(), None, data_shape=(2,), cond_dim=2, sde=kind)
        module.net = CondScoreNet(module.sde)
    return teacher_from_module(module, "ckpt.ckpt", {"note": kind})


@pytest.mark.parametrize("kind", ["edm", "ve", "vp", "subvp", "ddpm-eps", "ddpm-x0", "ddpm-v"])
def test_conditional_teachers_denoise_with_their_cond(kind):
    teacher = conditional_teacher(kind)
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(6, 2, generator=g)
    # DDPM: at its own noise levels (between them the net sees a fractional step index, tested below)
    sigmas = [teacher.module.level_sigmas[i].item() for i in (40, 300, 900)] if kind.startswith("ddpm") else [0.05, 0.8, 6.0]
    for sigma in sigmas:
        x = torch.randn(6, 2, generator=g) * (1 + sigma)
        exact = rowwise(lambda m, xr: m.denoiser(xr.double(), 1.0, sigma), x, cond).float()
        got = teacher.denoise(x, sigma, cond)
        torch.testing.assert_close(got, exact, rtol=0, atol=1e-4 * (1 + sigma))
        other = teacher.denoise(x, sigma, cond + 3.0)
        assert (other - got).abs().max() > 1e-2  # the cond really reaches the net
    assert teacher.path == "ckpt.ckpt" and teacher.config == {"note": kind}


def test_function_teacher_passes_cond():
    teacher = FunctionTeacher(lambda x, s, c: x * 0 + c, 0.01, 10.0)
    cond = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    torch.testing.assert_close(teacher.denoise(torch.zeros(2, 2), 1.0, cond), cond)


def test_ddpm_teachers_fractional_step_is_linear_in_log_sigma_and_clamped_to_the_grid():
    module = DDPM(nn.Identity(), None, data_shape=(2,), num_timesteps=100)
    teacher = teacher_from_module(module)
    assert isinstance(teacher, ModuleTeacher) and teacher.kind == "ddpm" and teacher.module is module
    grid = module.level_sigmas.log()
    for i in (0, 1, 50, 98):
        mid = torch.tensor([(0.25 * grid[i] + 0.75 * grid[i + 1]).exp().item()], dtype=torch.float64)
        assert module.level_of(mid).item() == pytest.approx(i + 0.75, abs=1e-9)
    below = torch.tensor([grid[0].exp().item() / 10], dtype=torch.float64)
    above = torch.tensor([grid[-1].exp().item() * 10], dtype=torch.float64)
    assert module.level_of(below).item() == 0.0 and module.level_of(above).item() == pytest.approx(99.0)
    # new with level_of: within 1e-4 of a level the index snaps to that integer (what the net was trained on),
    # beyond it the interpolation is left alone
    for i in (0, 1, 50, 98):
        near = torch.tensor([(grid[i] + 5e-5 * (grid[i + 1] - grid[i])).exp().item()], dtype=torch.float64)
        away = torch.tensor([(grid[i] + 2e-4 * (grid[i + 1] - grid[i])).exp().item()], dtype=torch.float64)
        assert module.level_of(near).item() == i
        assert module.level_of(away).item() == pytest.approx(i + 2e-4, abs=1e-9)


def test_a_teacher_needs_a_proper_sigma_range():
    for lo, hi in ((0.0, 1.0), (1.0, 1.0), (2.0, 1.0)):
        with pytest.raises(ValueError, match="0 < sigma_min < sigma_max"):
            Teacher(None, lo, hi)


def test_method_names_for_messages():
    names = {
        "lightning_modules.edm.EDM": "edm", "lightning_modules.ddpm.DDPM": "ddpm", "lightning_modules.ncsn.NCSN": "ncsn",
        "lightning_modules.bc_mse.BCMSE": "bc_mse", "lightning_modules.consistency.ConsistencyModel": "consistency",
        "lightning_modules.consistency_distillation.ConsistencyDistillation": "consistency",
        "lightning_modules.consistency_training.ConsistencyTraining": "consistency_training",
    }
    for target, name in names.items():
        assert method_name({"_target_": target}) == name
    for sde, name in (("ve", "vesde"), ("vp", "vpsde"), ("subvp", "subvpsde"), ("other", "score_sde")):
        assert method_name({"_target_": "lightning_modules.score_sde.ScoreSDE", "sde": sde}) == name
    assert method_name({"_target_": "lightning_modules.score_sde.ScoreSDE"}) == "vpsde"  # the default SDE
    assert method_name({"_target_": "my.Model"}) == "my.Model" and method_name({}) == "unknown"
    # the methods added with the shared core
    assert method_name({"_target_": "lightning_modules.flow_matching.FlowMatching"}) == "flow_matching"
    assert method_name({"_target_": "lightning_modules.scheduled_sampling.ScheduledSamplingDDPM"}) == "scheduled_sampling"
