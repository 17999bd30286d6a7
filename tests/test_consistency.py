"""Consistency models (CD and iCT): the boundary condition, teacher conversions against a Gaussian mixture's
exact denoiser, the distillation loss on a Gaussian whose consistency function is known in closed form, the iCT
schedules, training, sampling and the refusals.

A Gaussian N(m, s^2) perturbed to x0 + sigma n stays Gaussian, so its probability-flow ODE is affine:
x(sigma') = m + sqrt(s^2 + sigma'^2) / sqrt(s^2 + sigma^2) (x(sigma) - m). The exact consistency function is
that map to sigma_min, and the exact teacher is the Gaussian's denoiser.
"""

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import ExactDDPMNet, run_cli
from lightning_modules.analytic import GaussianMixture
from lightning_modules.checkpoint import build_model
from lightning_modules.consistency import ConsistencyPrecond, pseudo_huber, pseudo_huber_c
from lightning_modules.consistency_distillation import ConsistencyDistillation
from lightning_modules.consistency_training import ConsistencyTraining, ict_num_scales, ict_pair_probs
from lightning_modules.ddpm import DDPM
from lightning_modules.ncsn import NCSN
from lightning_modules.nets import MLP, UNet
from lightning_modules.score_sde import ScoreSDE
from lightning_modules.sde import VESDE
from lightning_modules.teachers import USABLE, FunctionTeacher, ModuleTeacher, load_teacher, teacher_from_module
from samplers import consistency as cm_sampling
from samplers import grids
from samplers.core import Counted, clipped
from samplers.ode import heun_step

MIXTURE = GaussianMixture(means=[[-2.0, 0.0], [2.0, 0.0], [0.0, 3.0]], stds=[0.3, 0.5, 0.4], weights=[0.2, 0.3, 0.5])
M, S = 0.7, 0.4  # the single Gaussian N(M, S^2) per coordinate
SD = 0.5


def adam(params):
    return torch.optim.Adam(params, lr=1e-3)


def small_mlp(dim=2, dropout=0.0):
    return MLP((dim,), hidden=32, depth=2, emb_dim=16, dropout=dropout)


def cm(net=None, **kw):
    kw.setdefault("total_steps", 1000)
    return ConsistencyTraining(net or small_mlp(), adam, data_shape=(2,), **kw)


def mixture_points(n=64, sigma=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return MIXTURE.sample(n, generator=g).double() + sigma * torch.randn(n, 2, generator=g, dtype=torch.float64)


# --- the parametrization -----------------------------------------------------------------------------


@pytest.mark.parametrize("make_net", [lambda: small_mlp(), lambda: UNet((1, 8, 8), ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), num_groups=8, dropout=0.0)])
def test_boundary_condition_holds_exactly_for_any_net(make_net):
    torch.manual_seed(0)
    net = make_net()
    for p in net.parameters():  # random everywhere, including the zero-initialised output layers
        nn.init.normal_(p, std=0.3)
    shape = (5, 2) if isinstance(net, MLP) else (5, 1, 8, 8)
    x = torch.randn(shape) * 3
    for sigma_min in (0.002, 0.01):
        precond = ConsistencyPrecond(net, SD, sigma_min)
        assert torch.equal(precond(x, sigma_min), x)
        # per-sample sigmas: only the rows at sigma_min are returned untouched
        sigma = torch.tensor([sigma_min, 1.0, sigma_min, 80.0, 0.5])
        out = precond(x, sigma)
        assert torch.equal(out[[0, 2]], x[[0, 2]]) and not torch.allclose(out[[1, 3, 4]], x[[1, 3, 4]])
    # the module's f uses its own sigma_min
    model = cm(small_mlp())
    for p in model.net.parameters():
        nn.init.normal_(p, std=0.3)
    x2 = torch.randn(7, 2)
    assert torch.equal(model.consistency_fn(x2, model.sigma_min), x2)


def test_coefficients_match_the_paper_and_approach_edm_at_large_sigma():
    precond = ConsistencyPrecond(nn.Identity(), SD, 0.002)
    sigma = torch.tensor([0.002, 0.1, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = precond.coefficients(sigma)
    torch.testing.assert_close(c_skip, SD**2 / ((sigma - 0.002) ** 2 + SD**2))
    torch.testing.assert_close(c_out, (sigma - 0.002) * SD / (sigma**2 + SD**2).sqrt())
    torch.testing.assert_close(c_in, (sigma**2 + SD**2).rsqrt())
    torch.testing.assert_close(c_noise, sigma.log() / 4)


# --- teachers: the VP -> VE change of variables against the exact mixture denoiser ---------------------


def MixtureEps(schedule, prediction="eps"):
    """A DDPM 'net' that returns the mixture's exact eps (or x0 / v) at integer step t."""
    return ExactDDPMNet(schedule, lambda x, a, s, cond: MIXTURE.score(x, a, s), prediction)


class MixtureScoreNet(nn.Module):
    """A ScoreSDE 'net' (s = -net / std) returning the mixture's exact std-scaled score for the module's SDE."""

    def __init__(self, sde):
        super().__init__()
        self.sde = sde

    def forward(self, x, level, cond=None):
        if isinstance(self.sde, VESDE):  # VE nets are fed log sigma(t)
            mean, std = torch.ones_like(level.double()), level.double().exp()
        else:  # VP nets are fed 999 t
            mean, std = self.sde.marginal(level.double() / 999.0)
        return (-std[:, None] * MIXTURE.score(x.double(), mean, std)).to(x.dtype)


class MixtureNCSNNet(nn.Module):
    """An NCSN 'net' returning the mixture's exact score: v2 (s = net(x, log sigma) / sigma) is fed log sigma,
    v1 (s = net(x, i)) the level index i of the geometric grid sigma_i = sigma_max (sigma_min / sigma_max)^(i / (L - 1))."""

    def __init__(self, parametrization, sigma_max, sigma_min, num_scales):
        super().__init__()
        self.parametrization, self.sigma_max, self.sigma_min, self.num_scales = parametrization, sigma_max, sigma_min, num_scales

    def forward(self, x, level, cond=None):
        if self.parametrization == "v2":
            sigma = level.double().exp()
            return (sigma[:, None] * MIXTURE.score(x.double(), 1.0, sigma)).to(x.dtype)
        ratio = math.log(self.sigma_min / self.sigma_max)
        sigma = self.sigma_max * torch.exp(level.double() / (self.num_scales - 1) * ratio)
        return MIXTURE.score(x.double(), 1.0, sigma).to(x.dtype)


def assert_module_teacher(teacher, module, kind):
    """The one teacher class: the module itself (frozen), its VE-form denoiser and its trained sigma range."""
    assert isinstance(teacher, ModuleTeacher) and teacher.kind == kind and teacher.module is module
    assert not module.training and not any(p.requires_grad for p in module.parameters())
    assert (teacher.sigma_min, teacher.sigma_max) == module.sigma_range
    x = mixture_points(8, sigma=1.0, seed=99)
    sigma = torch.full((8,), 0.7, dtype=x.dtype)
    assert torch.equal(teacher.denoise(x, sigma), module.denoise(x, sigma))


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_ddpm_teacher_is_the_exact_denoiser_on_its_grid(prediction):
    module = DDPM(nn.Identity(), None, data_shape=(2,), num_timesteps=1000, prediction=prediction)
    module.net = MixtureEps(module.schedule, prediction)
    teacher = teacher_from_module(module)
    assert_module_teacher(teacher, module, "ddpm")
    sched = module.schedule
    grid = sched.sqrt_one_minus_alphas_cumprod.double() / sched.sqrt_alphas_cumprod.double()
    # the level table is the noise the net was trained at: q_sample's float32 buffers agree with the float64
    # schedule to ~1e-7, so the table must too (rtol 1e-6 is ten times that)
    torch.testing.assert_close(module.level_sigmas, grid, rtol=1e-6, atol=0)
    assert teacher.sigma_min == pytest.approx(grid[0].item()) and teacher.sigma_max == pytest.approx(grid[-1].item())
    for i in (0, 3, 100, 500, 999):
        sigma = grid[i].item()
        x = mixture_points(sigma=sigma, seed=i)
        # level_of snaps to the integer within 1e-4 of it, so on its grid the index is exact (was: within 1e-6)
        assert module.level_of(torch.tensor([sigma], dtype=torch.float64)).item() == i
        torch.testing.assert_close(teacher.denoise(x, sigma), MIXTURE.denoiser(x, 1.0, sigma), rtol=1e-5, atol=1e-5 * (1 + sigma))
    # between two steps the fractional index lies between them
    mid = math.sqrt(grid[10].item() * grid[11].item())
    assert 10 < module.level_of(torch.tensor([mid], dtype=torch.float64)).item() < 11


@pytest.mark.parametrize("sde", ["ve", "vp", "subvp"])
def test_score_sde_teachers_are_the_exact_denoiser(sde):
    """VE, VP and sub-VP alike: x_t / mean = x0 + (std / mean) n is the VE form with sigma = std / mean, and
    D = x + sigma^2 score_VE with score_VE(x) = mean score_t(mean x). For sub-VP (std = 1 - e^-B, mean = e^(-B/2))
    sigma = 2 sinh(B / 2), so its teacher is as exact as VP's (it used to be refused)."""
    module = ScoreSDE(nn.Identity(), None, data_shape=(2,), sde=sde)
    module.net = MixtureScoreNet(module.sde)
    teacher = teacher_from_module(module)
    assert_module_teacher(teacher, module, {"ve": "vesde", "vp": "vpsde", "subvp": "subvpsde"}[sde])
    lo, hi = teacher.sigma_min, teacher.sigma_max
    b_lo, b_hi = 0.1 * 1e-5 + 0.5 * 19.9 * 1e-10, 0.1 + 0.5 * 19.9  # int_0^t beta at t = eps = 1e-5 and t = 1
    if sde == "ve":
        # hi is now sigma(1) = sigma_min exp(log(sigma_max / sigma_min)) (was sde.sigma_max itself): equal up to the
        # exp/log round trip, 50.000000000000036 in float64
        assert lo == pytest.approx(0.01, rel=1e-3) and hi == pytest.approx(50.0, rel=1e-14)
    elif sde == "vp":
        assert lo == pytest.approx(math.sqrt(math.expm1(b_lo)), rel=1e-3) and hi == pytest.approx(math.sqrt(math.expm1(b_hi)), rel=1e-9)
    else:  # std / mean from the marginal itself
        assert lo == pytest.approx(-math.expm1(-b_lo) / math.exp(-b_lo / 2), rel=1e-3)
        assert hi == pytest.approx(-math.expm1(-b_hi) / math.exp(-b_hi / 2), rel=1e-9)
    if sde != "ve":
        # the inverse of sigma(t) is exact, and sigma(t) is the marginal's std / mean
        t = torch.tensor([1e-5, 1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
        torch.testing.assert_close(module.sde.t_of_ve_sigma(module.sde.ve_sigma(t)), t)
        mean, std = module.sde.marginal(t)
        torch.testing.assert_close(module.sde.ve_sigma(t), std / mean)
    for sigma in (0.02, 0.3, 1.0, 7.0, 40.0):
        x = mixture_points(sigma=sigma, seed=int(sigma * 10))
        torch.testing.assert_close(teacher.denoise(x, sigma), MIXTURE.denoiser(x, 1.0, sigma), rtol=1e-6, atol=1e-6 * (1 + sigma))


@pytest.mark.parametrize("parametrization", ["v2", "v1"])
def test_ncsn_teacher_is_the_exact_denoiser(parametrization):
    """NCSN is a usable teacher now: D = x + sigma^2 s(x, sigma) (Tweedie); v1 between its levels sees the
    fractional index, which the exact net maps back to the same sigma."""
    module = NCSN(nn.Identity(), None, data_shape=(2,), sigma_max=50.0, sigma_min=0.01, num_scales=10, parametrization=parametrization)
    module.net = MixtureNCSNNet(parametrization, 50.0, 0.01, 10)
    teacher = teacher_from_module(module)
    assert_module_teacher(teacher, module, "ncsn")
    assert (teacher.sigma_min, teacher.sigma_max) == (0.01, 50.0)
    for sigma in (0.02, 0.3, 1.0, 7.0, 40.0, *module.sigmas.double().tolist()):
        x = mixture_points(sigma=sigma, seed=int(sigma * 10))
        torch.testing.assert_close(teacher.denoise(x, sigma), MIXTURE.denoiser(x, 1.0, sigma), rtol=1e-6, atol=1e-6 * (1 + sigma))


def test_modules_without_a_denoiser_are_refused():
    assert {"subvpsde", "ncsn"} <= set(USABLE) and not {"consistency", "consistency_training", "bc_mse"} & set(USABLE)
    with pytest.raises(ValueError, match="not a usable teacher.*consistency_training model.*edm, vesde, vpsde, subvpsde, ddpm, ncsn or flow_matching"):
        teacher_from_module(cm())


# --- the teacher's Heun step and the distillation loss -----------------------------------------------


def gaussian_denoiser(x, sigma, cond=None):
    sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return M + S**2 / (S**2 + sigma**2) * (x - M)


def gaussian_flow(x, sigma_from, sigma_to):
    """The exact PF-ODE map of N(M, S^2) from sigma_from to sigma_to."""
    ratio = (S**2 + torch.as_tensor(sigma_to, dtype=x.dtype) ** 2).sqrt() / (S**2 + torch.as_tensor(sigma_from, dtype=x.dtype) ** 2).sqrt()
    return M + ratio.reshape(-1, *([1] * (x.dim() - 1))) * (x - M)


def rk4_reference(denoise, x, sigma_from, sigma_to, n=400):
    h = (sigma_to - sigma_from) / n
    f = lambda x, s: (x - denoise(x, torch.full((x.shape[0],), s, dtype=x.dtype))) / s  # noqa: E731
    s = sigma_from
    for _ in range(n):
        k1 = f(x, s)
        k2 = f(x + h / 2 * k1, s + h / 2)
        k3 = f(x + h / 2 * k2, s + h / 2)
        k4 = f(x + h * k3, s + h)
        x, s = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), s + h
    return x


def test_one_heun_step_follows_the_exact_probability_flow():
    # Gaussian, against the closed form: a step of size h has local error O(h^3), so halving h cuts it ~8x,
    # and it is far below Euler's O(h^2).
    x = M + torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * math.sqrt(S**2 + 1.0)
    errors = []
    for h in (0.2, 0.1, 0.05):
        s0, s1 = torch.full((256,), 1.0, dtype=torch.float64), torch.full((256,), 1.0 - h, dtype=torch.float64)
        exact = gaussian_flow(x, s0, s1)
        errors.append((heun_step(gaussian_denoiser, x, s0, s1) - exact).abs().max().item())
        euler = x + (s1 - s0)[:, None] * (x - gaussian_denoiser(x, s0)) / s0[:, None]
        assert errors[-1] < 0.25 * (euler - exact).abs().max().item()
    assert errors[0] < 3e-3 and errors[0] / errors[1] > 6 and errors[1] / errors[2] > 6, errors
    # Mixture: one Heun step between adjacent levels of the 18-level Karras grid (CD's N) against fine RK4.
    denoise = lambda x, s: MIXTURE.denoiser(x, 1.0, s)  # noqa: E731
    grid = grids.karras(18).flip(0)
    for i in (3, 9, 15):
        lo, hi = grid[i].item(), grid[i + 1].item()
        xm = mixture_points(128, sigma=hi, seed=i)
        s_hi, s_lo = torch.full((128,), hi, dtype=torch.float64), torch.full((128,), lo, dtype=torch.float64)
        ref = rk4_reference(denoise, xm, hi, lo)
        rms = lambda v: v.pow(2).mean().sqrt().item()  # noqa: E731
        heun = rms(heun_step(denoise, xm, s_hi, s_lo) - ref)
        euler = rms(xm + (lo - hi) * (xm - denoise(xm, s_hi)) / hi - ref)
        # the worst step (sigma 5.3 -> 3.3, where the modes split) is not yet in the asymptotic regime: 0.013 of it
        assert heun < 0.02 * (hi - lo) and heun < 0.6 * euler, (i, heun, euler)


class ExactConsistencyNet(nn.Module):
    """F such that c_skip x + c_out F(c_in x, c_noise) is the exact consistency function of N(M, S^2) (or the identity)."""

    def __init__(self, sigma_min, wrong=False):
        super().__init__()
        self.sigma_min, self.wrong = sigma_min, wrong
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, u, c_noise, cond=None):
        sigma = (4 * c_noise.double()).exp()[:, None]
        x = u.double() * (sigma**2 + SD**2).sqrt()
        f = gaussian_flow(x, sigma[:, 0], torch.full_like(sigma[:, 0], self.sigma_min))
        if self.wrong:
            f = x  # the identity also meets the boundary condition, but is no consistency function
        c_skip = SD**2 / ((sigma - self.sigma_min) ** 2 + SD**2)
        c_out = (sigma - self.sigma_min) * SD / (sigma**2 + SD**2).sqrt()
        out = torch.where(c_out > 0, (f - c_skip * x) / c_out.clamp(min=1e-30), torch.zeros_like(x))
        return out.to(u.dtype) + 0 * self.dummy


def test_distillation_loss_vanishes_for_the_exact_student_with_an_exact_teacher():
    torch.manual_seed(0)
    x0 = M + S * torch.randn(4096, 2, dtype=torch.float64)
    losses = {}
    for wrong in (False, True):
        model = ConsistencyDistillation(ExactConsistencyNet(0.002, wrong), adam, data_shape=(2,), num_scales=18, mu=0.0)
        model.attach_teacher(FunctionTeacher(gaussian_denoiser, 0.002, 80.0))
        losses[wrong] = model.loss({"x": x0}, generator=torch.Generator().manual_seed(1)).item()
    # exact: only the Heun step's error is left (the data variance S^2 = 0.16 sets the scale)
    assert losses[False] < 2e-5 and losses[True] > 1.0, losses
    # the same with the target a mu > 0 EMA copy of the (exact) student
    model = ConsistencyDistillation(ExactConsistencyNet(0.002), adam, data_shape=(2,), mu=0.95)
    model.attach_teacher(FunctionTeacher(gaussian_denoiser, 0.002, 80.0))
    assert model.loss({"x": x0}, generator=torch.Generator().manual_seed(1)).item() < 1e-5


def test_distillation_with_an_exact_teacher_trains_the_student_toward_it():
    torch.manual_seed(0)
    model = ConsistencyDistillation(small_mlp(), lambda params: torch.optim.Adam(params, lr=3e-3), data_shape=(2,), num_scales=18)
    model.attach_teacher(FunctionTeacher(gaussian_denoiser, 0.002, 80.0))
    opt = model.configure_optimizers()
    x_eval = M + S * torch.randn(1024, 2)
    before = model.loss({"x": x_eval}, generator=torch.Generator().manual_seed(0)).item()
    for _ in range(60):
        loss = model.loss({"x": M + S * torch.randn(256, 2)})
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_target()  # what Lightning's optimizer_step hook does
    after = model.loss({"x": x_eval}, generator=torch.Generator().manual_seed(0)).item()
    assert after < 0.5 * before, (before, after)


def test_teacher_range_narrows_the_students_sigmas_with_a_warning():
    model = ConsistencyDistillation(small_mlp(), adam, data_shape=(2,), cm_sigmas=[80.0, 0.821])
    with pytest.warns(UserWarning, match="sigma_min=0.01"):
        model.attach_teacher(FunctionTeacher(gaussian_denoiser, 0.01, 50.0))
    assert model.sigma_min == pytest.approx(0.01) and model.sigma_max == 50.0
    assert model.train_grid(18)[0].item() == pytest.approx(0.01) and model.train_grid(18)[-1].item() == 50.0
    assert model.sample_sigmas(2) == [50.0, 0.821] and model.sample_sigmas(1) == [50.0]
    # the narrowed range is part of the state_dict, so a rebuilt module (load_module) samples on it
    fresh = ConsistencyDistillation(small_mlp(), adam, data_shape=(2,))
    fresh.load_state_dict(model.state_dict())
    assert (fresh.sigma_min, fresh.sigma_max) == (model.sigma_min, model.sigma_max)


# --- iCT ------------------------------------------------------------------------------------------------


def test_ict_curriculum_pair_probabilities_and_pseudo_huber():
    K = 400_000
    stage = math.floor(K / (math.log2(1280 // 10) + 1))  # 50_000
    assert stage == 50_000
    for k, expected in [(0, 11), (49_999, 11), (50_000, 21), (100_000, 41), (150_000, 81), (300_000, 641), (350_000, 1281), (399_999, 1281)]:
        assert ict_num_scales(k, K) == expected == min(10 * 2 ** (k // stage), 1280) + 1
    model = cm(total_steps=K)
    assert model.num_scales_at(0) == 11 and model.num_scales_at(120_000) == 41
    grid = grids.karras(41).flip(0)
    probs = ict_pair_probs(grid)
    assert probs.shape == (40,) and abs(probs.sum().item() - 1) < 1e-12 and (probs > 0).all()
    cdf = [math.erf((math.log(s) + 1.1) / (math.sqrt(2) * 2.0)) for s in grid.tolist()]
    mass = [b - a for a, b in zip(cdf, cdf[1:])]
    torch.testing.assert_close(probs, torch.tensor(mass, dtype=torch.float64) / sum(mass))
    # pseudo-Huber: c = 0.00054 sqrt(d); the loss is the paper's divided by sqrt(d)
    assert pseudo_huber_c(3072) == pytest.approx(0.02993, abs=1e-5)
    diff = torch.randn(3, 3, 4, 4)
    c = pseudo_huber_c(48)
    paper = (diff.flatten(1).pow(2).sum(1) + c**2).sqrt() - c
    torch.testing.assert_close(pseudo_huber(diff), paper / math.sqrt(48))
    # iCT pairs follow the probabilities; weights are 1 / (sigma_{i+1} - sigma_i)
    model = cm(total_steps=K)
    lo, hi = model.pair(20_000, "cpu", torch.Generator().manual_seed(0))
    g11 = model.train_grid(11)
    idx = torch.searchsorted(g11, lo)
    torch.testing.assert_close(g11[idx + 1], hi)
    freq = torch.bincount(idx, minlength=10).double() / 20_000
    assert (freq - ict_pair_probs(g11)).abs().max() < 0.015


def test_consistency_training_reduces_its_loss():
    # A narrow Gaussian: there the teacher-free pair x + sigma z lies nearly on one ODE trajectory, so the
    # loss can fall well below its start (on a multimodal toy its floor is high at N = 11).
    torch.manual_seed(0)
    model = cm(small_mlp(), total_steps=1000)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    data = lambda n, g=None: 0.5 + 0.05 * torch.randn(n, 2, generator=g)  # noqa: E731
    x_eval = data(1024, torch.Generator().manual_seed(1))
    before = model.loss({"x": x_eval}, generator=torch.Generator().manual_seed(0)).item()
    for _ in range(50):
        loss = model.loss({"x": data(256)})
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.loss({"x": x_eval}, generator=torch.Generator().manual_seed(0)).item()
    assert model.num_scales_at(model.global_step) == 11
    assert after < 0.7 * before, (before, after)


def test_dropout_masks_are_shared_by_student_and_target():
    torch.manual_seed(0)
    net = small_mlp(dropout=0.5)
    nn.init.normal_(net.fc_out.weight, std=0.5)
    model = ConsistencyDistillation(net, adam, data_shape=(2,))
    model.attach_teacher(FunctionTeacher(gaussian_denoiser, 0.002, 80.0))
    assert model.has_dropout and model.net.training
    # A zero-width pair (the Heun step stays put): f and f^- then differ only through dropout.
    model.pair = lambda b, device, generator=None: (torch.full((b,), 1.0, dtype=torch.float64),) * 2
    x = torch.randn(8, 2)
    assert model.loss({"x": x}).item() == 0.0
    model.has_dropout = False  # without replaying the RNG the masks differ
    assert model.loss({"x": x}).item() > 0.0


# --- the target network ----------------------------------------------------------------------------


def test_target_network_is_a_frozen_ema_kept_in_the_state_dict_and_the_teacher_is_not():
    model = ConsistencyDistillation(small_mlp(), adam, data_shape=(2,), mu=0.9)
    model.attach_teacher(FunctionTeacher(gaussian_denoiser, 0.002, 80.0))
    keys = model.state_dict().keys()
    assert any(k.startswith("target_net.") for k in keys) and not any("teacher" in k for k in keys)
    assert all(not p.requires_grad for p in model.target_net.parameters())
    assert all(p.requires_grad for p in model.net.parameters())
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(1.0)
    old = [p.clone() for p in model.target_net.parameters()]
    model.update_target()
    for t, o, p in zip(model.target_net.parameters(), old, model.net.parameters()):
        torch.testing.assert_close(t, 0.9 * o + 0.1 * p)
    assert cm(mu=0.0).target_net is None and "target_net" not in str(list(cm().state_dict()))
    # defaults: an EMA target (0.95) for distillation, a stop-gradient copy for iCT
    assert ConsistencyDistillation(small_mlp(), adam, data_shape=(2,)).mu == 0.95 and cm().mu == 0.0


def test_lightning_updates_the_target_after_each_optimizer_step(tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    model = ConsistencyTraining(small_mlp(), adam, data_shape=(2,), mu=0.5)
    before = [p.clone() for p in model.target_net.parameters()]
    data = [{"x": x} for x in MIXTURE.sample(64).split(32)]
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(model, DataLoader(data, batch_size=None))
    for t, o, p in zip(model.target_net.parameters(), before, model.net.parameters()):
        torch.testing.assert_close(t, 0.5 * o + 0.5 * p)


# --- sampling --------------------------------------------------------------------------------------


def test_one_and_two_step_sampling_shapes_nfe_and_levels():
    model = cm(small_mlp())
    g = torch.Generator().manual_seed(0)
    assert model.sampler == "cm" and model.sample_steps == 1 and model.nfe() == 1 and model.nfe("cm", 2) == 2
    assert model.sample(10, generator=g).shape == (10, 2)
    assert model.sample(10, steps=2, generator=g).shape == (10, 2)
    assert model.sample_sigmas(1) == [80.0]
    two = model.sample_sigmas(2)
    assert two[0] == 80.0 and 0.002 < two[1] < 80.0 and two[1] == pytest.approx(grids.karras(3)[1].item())
    # one step is f(sigma_max z, sigma_max)
    x_T = 80.0 * torch.randn(6, 2)
    torch.testing.assert_close(model.sample(6, x_T=x_T), model.consistency_fn(x_T, 80.0))
    # cm_sigmas sets the levels when its length matches steps; sample.py's sampler/steps/progress kwargs are accepted
    model = cm(small_mlp(), cm_sigmas=[80.0, 0.661])
    assert model.nfe() == 2 and model.sample_sigmas() == [80.0, 0.661] and model.nfe("cm", 3) == 3
    assert model.sample_many(5, 2, torch.Generator().manual_seed(0), sampler="cm", steps=2, progress=False).shape == (5, 2)
    clipped_model = cm(small_mlp(), clip_denoised=True)
    nn.init.normal_(clipped_model.net.fc_out.weight, std=5.0)
    x = clipped_model.sample(50, steps=2, generator=torch.Generator().manual_seed(3))
    assert x.abs().max() <= 1.0
    # clip_denoised clamps every output of f (the clip multistep_sample(clip=True) did), by wrapping f in clipped()
    g = torch.Generator().manual_seed(3)
    x_T = 80.0 * torch.randn(50, 2, generator=g)
    f = lambda v, s: clipped_model.consistency_fn(v, s)  # noqa: E731
    sigmas = torch.tensor(clipped_model.sample_sigmas(2), dtype=torch.float64)
    torch.testing.assert_close(x, cm_sampling.multistep(clipped(f), x_T, sigmas, g, sigma_min=clipped_model.sigma_min))
    assert f(x_T, torch.full((50,), 80.0)).abs().max() > 1.0  # so the clamp is really exercised
    # a consistency function is not E[x0 | x]: every denoiser sampler of the registry is refused
    for sampler in ("heun", "euler", "ddim", "pc"):
        with pytest.raises(ValueError, match=f"sampler={sampler} is not defined for ConsistencyTraining"):
            model.sample(2, sampler=sampler)
    with pytest.raises(ValueError, match="cm_sigmas"):
        cm(cm_sigmas=[0.5, 80.0])


def test_bad_settings_fail_with_their_names():
    with pytest.raises(ValueError, match="not available"):
        cm(loss="lpips")
    with pytest.raises(TypeError, match="mode"):  # the two methods are two classes; model.mode is refused by config_checks
        cm(mode="distill")
    model = ConsistencyDistillation(small_mlp(), adam, data_shape=(2,))
    with pytest.raises(ValueError, match="teacher_ckpt"):
        model.loss({"x": torch.randn(4, 2)})
    with pytest.raises(ValueError, match="teacher_ckpt"):
        model.setup("fit")
    no_k = ConsistencyTraining(small_mlp(), adam, data_shape=(2,))
    with pytest.raises(ValueError, match="total_steps"):
        no_k.loss({"x": torch.randn(4, 2)})


# --- checkpoints as teachers -----------------------------------------------------------------------

NET_CFG = {"_target_": "lightning_modules.nets.MLP", "hidden": 32, "depth": 1, "emb_dim": 16}
OPT_CFG = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}


def write_ckpt(path, model_cfg, data_shape=(2,), cond_dim=None, module=None):
    """A checkpoint as train.py writes it (config, shapes, EMA state_dict), without training."""
    config = {"net": NET_CFG, "model": {**model_cfg, "optimizer": OPT_CFG}, "data": {"_target_": "datamodules.toy2d.Toy2DDataModule", "name": "moons"}}
    if module is None:
        module = build_model(OmegaConf.create(config), data_shape, cond_dim)
    meta = {"config": config, "data_shape": list(data_shape), "cond_dim": cond_dim, "method": "x"}
    torch.save({"difflab": meta, "state_dict": module.state_dict()}, path)
    return module


def test_checkpoints_load_as_frozen_teachers_and_warm_start_an_identical_net(tmp_path):
    edm = write_ckpt(tmp_path / "edm.ckpt", {"_target_": "lightning_modules.edm.EDM"})
    torch.manual_seed(0)
    nn.init.normal_(edm.net.fc_out.weight)  # a non-trivial net, saved again
    write_ckpt(tmp_path / "edm.ckpt", {"_target_": "lightning_modules.edm.EDM"}, module=edm)
    teacher = load_teacher(tmp_path / "edm.ckpt", (2,), None)
    assert teacher.kind == "edm" and (teacher.sigma_min, teacher.sigma_max) == (0.002, 80.0)
    assert not teacher.module.training and not any(p.requires_grad for p in teacher.module.parameters())
    x = torch.randn(5, 2)
    torch.testing.assert_close(teacher.denoise(x, 0.7), edm.denoise(x, 0.7))
    # the student warm-starts from it (same net config) and keeps it out of its module tree
    student = build_model(OmegaConf.create({"net": NET_CFG, "model": {"_target_": "lightning_modules.consistency_distillation.ConsistencyDistillation",
                                                                         "teacher_ckpt": str(tmp_path / "edm.ckpt"), "optimizer": OPT_CFG}}), (2,), None)
    student.run_config = {"net": NET_CFG}
    student.setup("fit")
    torch.testing.assert_close(student.net.fc_out.weight, edm.net.fc_out.weight)
    assert student.teacher is not None and "teacher" not in " ".join(student.state_dict())
    assert all(m is not teacher.module for m in student.modules())
    import copy

    assert copy.deepcopy(student).__dict__["_teacher"] is student.teacher  # the EMA callback's copy shares it
    # ddpm and vesde checkpoints load through their conversions
    write_ckpt(tmp_path / "ddpm.ckpt", {"_target_": "lightning_modules.ddpm.DDPM", "num_timesteps": 100})
    write_ckpt(tmp_path / "ve.ckpt", {"_target_": "lightning_modules.score_sde.ScoreSDE", "sde": "ve"})
    assert load_teacher(tmp_path / "ddpm.ckpt", (2,)).kind == "ddpm"
    assert load_teacher(tmp_path / "ve.ckpt", (2,)).kind == "vesde"


@pytest.mark.parametrize(
    "model_cfg, name",
    [
        ({"_target_": "lightning_modules.ncsn.NCSN"}, "ncsn"),
        ({"_target_": "lightning_modules.score_sde.ScoreSDE", "sde": "subvp"}, "subvpsde"),
    ],
)
def test_ncsn_and_subvp_checkpoints_load_as_teachers(tmp_path, model_cfg, name):
    """Once refused, now usable: any method with a VE-form denoiser is a teacher (its exactness is checked above)."""
    module = write_ckpt(tmp_path / "t.ckpt", model_cfg)
    torch.manual_seed(0)
    nn.init.normal_(module.net.fc_out.weight)  # a non-trivial net, saved again
    write_ckpt(tmp_path / "t.ckpt", model_cfg, module=module)
    teacher = load_teacher(tmp_path / "t.ckpt", (2,))
    assert isinstance(teacher, ModuleTeacher) and teacher.kind == name and teacher.path == str(tmp_path / "t.ckpt")
    assert (teacher.sigma_min, teacher.sigma_max) == module.sigma_range
    assert not teacher.module.training and not any(p.requires_grad for p in teacher.module.parameters())
    x = torch.randn(5, 2)
    torch.testing.assert_close(teacher.denoise(x, 0.7), module.denoise(x, 0.7))
    assert (teacher.denoise(x, 0.7) - x).abs().max() > 1e-3  # the loaded weights, not a zero net


@pytest.mark.parametrize(
    "model_cfg, name",
    [
        ({"_target_": "lightning_modules.consistency.ConsistencyModel", "mode": "train"}, "consistency"),  # before the split
        ({"_target_": "lightning_modules.consistency_distillation.ConsistencyDistillation"}, "consistency"),
        ({"_target_": "lightning_modules.consistency_training.ConsistencyTraining"}, "consistency_training"),
        ({"_target_": "lightning_modules.bc_mse.BCMSE"}, "bc_mse"),
    ],
)
def test_unusable_checkpoints_are_refused(tmp_path, model_cfg, name):
    path = tmp_path / "t.ckpt"
    config = {"net": NET_CFG, "model": {**model_cfg, "optimizer": OPT_CFG}}
    torch.save({"difflab": {"config": config, "data_shape": [2], "cond_dim": None, "method": name}, "state_dict": {}}, path)
    with pytest.raises(ValueError, match=f"not a usable teacher: .* is a {name} checkpoint.*use a checkpoint of edm, vesde, vpsde, subvpsde, ddpm, ncsn or flow_matching"):
        load_teacher(path, (2,))


@pytest.mark.parametrize("mode, cls", [("train", ConsistencyTraining), ("distill", ConsistencyDistillation)])
def test_checkpoints_from_before_the_split_load_as_the_class_their_mode_named(tmp_path, mode, cls):
    """Until the split, both were one class with `mode`; such a checkpoint rebuilds as the right class with the
    same outputs, and a resume with today's config passes the compatibility check."""
    from lightning_modules.checkpoint import check_compatible, load_module

    module = cls(MLP((2,), hidden=32, depth=1, emb_dim=16), adam, data_shape=(2,), total_steps=100) if cls is ConsistencyTraining \
        else cls(MLP((2,), hidden=32, depth=1, emb_dim=16), adam, data_shape=(2,))
    torch.manual_seed(0)
    nn.init.normal_(module.net.fc_out.weight)
    legacy = {"_target_": "lightning_modules.consistency.ConsistencyModel", "mode": mode, "teacher_ckpt": None, "num_scales": 18,
              "s0": 10, "s1": 1280, "total_steps": 100, "mu": None, "optimizer": OPT_CFG}
    state = module.state_dict()
    state["sigma_range"] = state.pop("trained_sigmas")  # the buffer's name then
    config = {"net": NET_CFG, "model": legacy, "data": {"_target_": "datamodules.toy2d.Toy2DDataModule", "name": "moons"}}
    torch.save({"difflab": {"config": config, "data_shape": [2], "cond_dim": None, "method": "x"}, "state_dict": state}, tmp_path / "old.ckpt")
    loaded, ckpt = load_module(tmp_path / "old.ckpt")
    assert type(loaded) is cls
    x = torch.randn(5, 2)
    torch.testing.assert_close(loaded.consistency_fn(x, 1.3), module.consistency_fn(x, 1.3))
    today = {"_target_": f"lightning_modules.{cls.__module__.split('.')[-1]}.{cls.__name__}", "optimizer": OPT_CFG}
    check_compatible(ckpt, OmegaConf.create({**config, "model": today}), tmp_path / "old.ckpt")


def test_the_removed_mode_setting_names_the_two_methods():
    from difflab.config_checks import check_config

    with pytest.raises(ValueError, match="model.mode=train is gone.*model=consistency .*model=consistency_training"):
        check_config(OmegaConf.create({"model": {"_target_": "x", "mode": "train"}}))


def test_teachers_for_other_data_or_other_files_are_refused(tmp_path):
    write_ckpt(tmp_path / "edm.ckpt", {"_target_": "lightning_modules.edm.EDM"})
    with pytest.raises(ValueError, match=r"shape \(2,\).*shape \(3,\)"):
        load_teacher(tmp_path / "edm.ckpt", (3,))
    with pytest.raises(ValueError, match="cond_dim"):
        load_teacher(tmp_path / "edm.ckpt", (2,), cond_dim=4)
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match="not written by this project"):
        load_teacher(tmp_path / "foreign.ckpt", (2,))
    with pytest.raises(FileNotFoundError):
        load_teacher(tmp_path / "missing.ckpt", (2,))


# --- end to end --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_edm_teacher_distill_and_sample_one_step(tmp_path):
    tiny = ["data=toy2d", "net.hidden=32", "net.depth=1", "trainer.max_steps=20", "trainer.val_check_interval=10",
            "final_eval.num_samples=64", "callbacks.quality.num_samples=64", "callbacks.sample_logger.num_samples=64", "logger=csv"]
    teacher_dir = tmp_path / "teacher"
    run_cli("train.py", "model=edm", "final_eval.steps=5", f"hydra.run.dir={teacher_dir}", *tiny)
    student_dir = tmp_path / "student"
    out = run_cli("train.py", "model=consistency", f"model.teacher_ckpt={teacher_dir / 'checkpoints' / 'last.ckpt'}",
                  f"hydra.run.dir={student_dir}", *tiny)
    assert "warm start" in out.stdout + out.stderr and "(cm, 1 NFE)" in out.stdout
    import json

    metrics = json.loads((student_dir / "final" / "metrics.json").read_text())
    assert metrics["sampler"] == "cm" and metrics["nfe"] == 1 and math.isfinite(metrics["value"])
    ckpt = torch.load(student_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any("teacher" in k for k in ckpt["state_dict"])
    sample = run_cli("sample.py", f"ckpt_path={student_dir / 'checkpoints' / 'last.ckpt'}", "sampler=cm", "steps=1",
                     "num_samples=16", f"out_dir={tmp_path / 'samples'}", "progress=false")
    assert "16 samples" in sample.stdout
    import numpy as np

    saved = np.load(tmp_path / "samples" / "samples.npz")
    assert saved["samples"].shape == (16, 2) and int(saved["nfe"]) == 1
    # the same teacher tuned into a consistency model (ECT): warm start, one step, its schedule logged
    tuned_dir = tmp_path / "tuned"
    out = run_cli("train.py", "model=consistency_tuning", f"model.init_ckpt={teacher_dir / 'checkpoints' / 'last.ckpt'}",
                  f"hydra.run.dir={tuned_dir}", "trainer.log_every_n_steps=5", *tiny)
    assert "warm start" in out.stdout + out.stderr and "(cm, 1 NFE)" in out.stdout
    assert json.loads((tuned_dir / "final" / "metrics.json").read_text())["nfe"] == 1
    (metrics_csv,) = tuned_dir.rglob("metrics.csv")
    assert "train/ect_stage" in metrics_csv.read_text().splitlines()[0]


# --- the iCT loss, term by term -------------------------------------------------------------------------


class AffineNet(nn.Module):
    """F(u, c_noise) = 0.3 u + c_noise: simple enough to write f = c_skip x + c_out F(c_in x, c_noise) by hand."""

    def forward(self, u, c_noise, cond=None):
        return 0.3 * u + c_noise[:, None].to(u.dtype)


def paper_consistency_fn(x, sigma, sigma_min=0.002, sd=SD):
    """The CM paper's parametrization (Appendix C), written out independently of the module."""
    sigma = sigma.double()[:, None]
    c_skip = sd**2 / ((sigma - sigma_min) ** 2 + sd**2)
    c_out = (sigma - sigma_min) * sd / (sigma**2 + sd**2).sqrt()
    c_in = 1 / (sigma**2 + sd**2).sqrt()
    return c_skip * x.double() + c_out * (0.3 * c_in * x.double() + sigma.log() / 4)


def test_ict_loss_is_the_weighted_pseudo_huber_gap_of_one_shared_noise():
    """iCT (Song & Dhariwal 2023): E[ 1 / (sigma_{i+1} - sigma_i) * d(f(x + sigma_{i+1} z), f^-(x + sigma_i z)) ], the
    same z at both levels, d the pseudo-Huber metric. Recomputed from the module's own draws (the pair first,
    then z), so a missing weight, a fresh z for the lower level or an l2 metric fails."""
    model = cm(AffineNet(), mu=0.0, total_steps=400_000)
    x0 = mixture_points(256, seed=3).float()
    got = model.loss({"x": x0}, torch.Generator().manual_seed(5))
    torch.testing.assert_close(got.double(), ict_loss_by_hand(model, x0, seed=5), rtol=2e-4, atol=0)
    assert model.loss_name == "pseudo_huber"


def ict_loss_by_hand(model, x0, seed):
    """The iCT loss of an AffineNet model, recomputed from its own draws (the pair first, then one z)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = model.pair(x0.shape[0], "cpu", g)
    z = torch.randn(x0.shape, generator=g)
    student = paper_consistency_fn(x0 + hi[:, None].float() * z, hi)
    target = paper_consistency_fn(x0 + lo[:, None].float() * z, lo)
    c = pseudo_huber_c(2)
    huber = ((student - target).pow(2).sum(1) + c**2).sqrt() - c
    return (huber / math.sqrt(2) / (hi - lo)).mean()


# --- sampling: the exact consistency function gives the exact law ---------------------------------------


def gaussian_consistency_fn(sigma_min):
    """The exact consistency function of N(M, S^2): the PF-ODE map from sigma to sigma_min."""
    def f(x, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        return gaussian_flow(x.double(), sigma.expand(x.shape[0]), torch.full((x.shape[0],), sigma_min, dtype=torch.float64))
    return f


def assert_gaussian(x: torch.Tensor, mean: float, std: float) -> None:
    """Sample mean within 5 standard errors and sample std within 5 of its own (sqrt(1/(2n)) relative)."""
    n = x.numel()
    assert abs(x.mean().item() - mean) < 5 * std / math.sqrt(n), (x.mean().item(), mean)
    assert abs(x.std().item() / std - 1) < 5 / math.sqrt(2 * n), (x.std().item(), std)


def test_one_step_module_sample_is_the_pushed_forward_prior():
    """sample() draws x_T = sigma_max z (not unit noise): one step of the exact f then gives exactly
    N(M (1 - r), (r sigma_max)^2), r = sqrt(S^2 + sigma_min^2) / sqrt(S^2 + sigma_max^2): N(M, S^2) to 0.5 %."""
    model = cm(ExactConsistencyNet(0.002), mu=0.0)
    x = model.sample(50_000, generator=torch.Generator().manual_seed(0)).double()
    r = math.sqrt(S**2 + 0.002**2) / math.sqrt(S**2 + 80.0**2)
    assert_gaussian(x, M * (1 - r), r * 80.0)


@pytest.mark.parametrize("sigmas", [[80.0, 1.5], [80.0, 3.0, 1.0]])
def test_multistep_sampling_renoises_to_each_level_from_sigma_min(sigmas):
    """Algorithm 1: after f the sample sits at sigma_min, so reaching level s adds sqrt(s^2 - sigma_min^2) z.
    sigma_min = 0.8 (large on purpose) makes that term visible: adding s z instead shifts the variance by r_s^2 0.64."""
    sigma_min, n = 0.8, 50_000
    f = gaussian_consistency_fn(sigma_min)
    x = cm_sampling.multistep(f, 80.0 * torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64),
                              torch.tensor(sigmas, dtype=torch.float64), torch.Generator().manual_seed(2), sigma_min=sigma_min)
    mean, var = M, 80.0**2  # x_T = 80 z: a point of the PF-ODE started off the data mean, carried along exactly
    mean_shift = -M
    for i, s in enumerate(sigmas):
        if i:
            var = var + s**2 - sigma_min**2
        r = math.sqrt(S**2 + sigma_min**2) / math.sqrt(S**2 + s**2)
        mean_shift, var = r * mean_shift, r**2 * var
    assert_gaussian(x, mean + mean_shift, math.sqrt(var))
    # one evaluation of f per level, and a trailing 0 in the grid (the denoiser samplers' convention) is ignored
    counted = Counted(f)
    again = cm_sampling.multistep(counted, 80.0 * torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64),
                                  grids.append_zero(torch.tensor(sigmas, dtype=torch.float64)), torch.Generator().manual_seed(2),
                                  sigma_min=sigma_min)
    assert torch.equal(again, x) and counted.calls == len(sigmas)


def test_ict_logs_its_curriculum_and_a_teacher_must_overlap_the_students_range(tmp_path):
    import lightning.pytorch as pl

    from datamodules.toy2d import Toy2DDataModule

    model = cm(total_steps=100)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(model, datamodule=Toy2DDataModule("moons", num_train=256, num_val=64, batch_size=64))
    assert trainer.callback_metrics["train/num_scales"] == model.num_scales_at(1) > model.num_scales_at(0)
    student = ConsistencyDistillation(small_mlp(), adam, data_shape=(2,), sigma_min=0.002, sigma_max=80.0)
    with pytest.raises(ValueError, match="which misses"):
        student.attach_teacher(FunctionTeacher(gaussian_denoiser, 80.0, 100.0))  # touches the range at one point only


# --- settings and their limits (each bound checked on both sides) ---------------------------------------


def test_pseudo_huber_is_its_closed_form_and_the_precond_defaults_to_sigma_data_half():
    diff = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(pseudo_huber(diff, c0=0.5), torch.tensor([math.sqrt(12.5 + 0.25) - 0.5, 0.0]))
    assert ConsistencyPrecond(small_mlp()).sigma_data == 0.5


@pytest.mark.parametrize("bad", [dict(sigma_min=0.0), dict(mu=1.5), dict(s0=0), dict(s0=20, s1=10), dict(p_std=0.0), dict(sigma_data=0.0),
                                 dict(cm_sigmas=[80.0, 10.0, 0.002]), dict(cm_sigmas=[10.0, 10.0, 1.0]),
                                 dict(cm_sigmas=[100.0, 1.0])])
def test_out_of_range_settings_are_refused(bad):
    with pytest.raises(ValueError):
        cm(**bad)


def test_settings_on_the_edge_of_their_range_are_accepted():
    cm(s0=1, s1=1, p_std=1.0, cm_sigmas=[80.0 * (1 + 1e-6), 1.0])
    ConsistencyDistillation(small_mlp(), adam, data_shape=(2,), num_scales=2)
    with pytest.raises(ValueError, match="num_scales"):
        ConsistencyDistillation(small_mlp(), adam, data_shape=(2,), num_scales=1)


def test_consistency_training_takes_no_teacher():
    with pytest.raises(TypeError, match="teacher_ckpt"):
        cm(teacher_ckpt="teacher.ckpt")


def test_distillation_draws_every_adjacent_pair_of_the_grid():
    model = ConsistencyDistillation(small_mlp(), adam, data_shape=(2,), num_scales=4)
    hi, lo = model.pair(3000, "cpu", torch.Generator().manual_seed(0))
    grid = model.train_grid(4, "cpu")
    assert sorted(set(hi.tolist())) == sorted(grid[:-1].tolist()) and sorted(set(lo.tolist())) == sorted(grid[1:].tolist())
