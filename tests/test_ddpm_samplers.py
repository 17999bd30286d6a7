"""DDPM samplers with the exact eps of a Gaussian mixture must reproduce the mixture.

With eps(x_t, t) = -sqrt(1 - abar_t) * grad log q_t(x_t) known in closed form (conftest.ExactDDPMNet in a
DDPM's net slot), sampling error comes only from the sampler: tolerances are standard errors of the sample
size (and, for few-step DDIM, a stated discretisation allowance). The samplers are the registry's, run on the
DDPM's VE-form denoiser through DDPM.sample; its grids are samplers.grids.discrete_levels on module.level_sigmas.
"""

import math

import pytest
import torch
from torch import nn

import samplers
from conftest import ExactDDPMNet
from lightning_modules.analytic import GaussianMixture
from lightning_modules.ddpm import DDPM
from difflab.errors import ConfigError
from samplers import grids

MIXTURE = GaussianMixture(means=[[-2.0, 0.0], [2.0, 0.0], [0.0, 3.0]], stds=[0.3, 0.5, 0.4], weights=[0.2, 0.3, 0.5])
N = 4000


def exact_ddpm(mixture: GaussianMixture, schedule_name: str = "linear", num_timesteps: int = 1000, **kwargs) -> DDPM:
    """A DDPM whose net returns the mixture's exact eps at its (integer) step index."""
    kwargs["sampling"] = {"steps": min(50, num_timesteps), **kwargs.get("sampling", {})}
    module = DDPM(nn.Identity(), None, data_shape=(mixture.dim,), num_timesteps=num_timesteps, schedule=schedule_name, **kwargs)
    module.net = ExactDDPMNet(module.schedule, lambda x, a, s, cond: mixture.score(x, a, s))
    return module


def check_matches_mixture(x: torch.Tensor, mixture: GaussianMixture, extra_rel_std: float = 0.0):
    """Mode weights, means and stds each within 5 standard errors of the sample size (plus `extra_rel_std` times
    the mode's std, a sampler's stated discretisation allowance). What that can detect for MIXTURE at N = 4000
    (modes of weight 0.2 / 0.3 / 0.5, std 0.3 / 0.5 / 0.4): a weight off by 0.032 / 0.036 / 0.040 (16 / 12 / 8 %),
    a mean off by 0.053 / 0.072 / 0.045 (18 / 14 / 11 % of the std), a std off by 12.5 / 10 / 8 %. The guards
    below are near misses of those sizes, so a sampler error just above them fails."""
    labels = torch.cdist(x.double(), mixture.means).argmin(1)
    n = x.shape[0]
    for k in range(len(mixture.weights)):
        w = mixture.weights[k].item()
        frac = (labels == k).float().mean().item()
        assert abs(frac - w) < 5 * math.sqrt(w * (1 - w) / n), f"mode {k}: weight {frac:.3f} vs {w:.3f}"
        xk = x[labels == k].double()
        nk, s = xk.shape[0], mixture.stds[k].item()
        mean_err = (xk.mean(0) - mixture.means[k]).abs().max().item()
        assert mean_err < 5 * s / math.sqrt(nk) + extra_rel_std * s, f"mode {k}: mean off by {mean_err:.4f}"
        std = xk.std(0)
        std_err = (std - s).abs().max().item()
        assert std_err < 5 * s / math.sqrt(2 * nk) + extra_rel_std * s, f"mode {k}: std {std.tolist()} vs {s}"


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_ancestral_reproduces_the_mixture(schedule_name, variance):
    module = exact_ddpm(MIXTURE, schedule_name)
    g = torch.Generator().manual_seed(0)
    x = module.sample(N, sampler="ancestral", variance=variance, generator=g)
    check_matches_mixture(x, MIXTURE)


@pytest.mark.parametrize("steps,eta,allowance", [(1000, 0.0, 0.0), (50, 0.0, 0.05), (100, 1.0, 0.05)])
def test_ddim_reproduces_the_mixture(steps, eta, allowance):
    module = exact_ddpm(MIXTURE)
    g = torch.Generator().manual_seed(1)
    x = module.sample(N, sampler="ddim", steps=steps, eta=eta, generator=g)
    check_matches_mixture(x, MIXTURE, extra_rel_std=allowance)


NEAR_MISSES = {
    # just above what check_matches_mixture resolves at N = 4000 (see its docstring): ~1.3-1.6x the bound
    "weights": GaussianMixture(MIXTURE.means, MIXTURE.stds, weights=[0.25, 0.3, 0.45]),
    "stds": GaussianMixture(MIXTURE.means, MIXTURE.stds * 1.15, MIXTURE.weights),
    "means": GaussianMixture(MIXTURE.means + torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.07, 0.0]], dtype=torch.float64),
                             MIXTURE.stds, MIXTURE.weights),
}


@pytest.mark.parametrize("wrong", list(NEAR_MISSES))
def test_sampler_with_a_slightly_wrong_eps_fails_the_check(wrong):
    """Guard against a check that cannot fail, with errors barely above its resolution: exact 1000-step DDIM
    sampling of a mixture whose weights, stds or one mean are a little off must be rejected."""
    module = exact_ddpm(NEAR_MISSES[wrong])
    g = torch.Generator().manual_seed(2)
    x = module.sample(N, sampler="ddim", steps=1000, generator=g)
    with pytest.raises(AssertionError):
        check_matches_mixture(x, MIXTURE)


def test_leading_spacing_is_diffusers_default_ddim_timesteps():
    """diffusers' DDIMScheduler (timestep_spacing='leading', steps_offset=0), what LeRobot's DDIM visits:
    arange(steps) * (T // steps), reversed; it starts below T-1 unless steps divides into T exactly once per level."""
    for T, steps in ((100, 10), (1000, 50), (100, 7), (100, 100)):
        sigmas = torch.linspace(0.01, 10.0, T)
        want = [k * (T // steps) for k in range(steps - 1, -1, -1)]
        assert grids.discrete_levels(sigmas, steps, "leading").tolist() == want
    assert grids.discrete_levels(torch.linspace(0.01, 10.0, 100), 10, "leading").tolist() == [90, 80, 70, 60, 50, 40, 30, 20, 10, 0]


def test_ddim_timesteps_start_at_pure_noise_and_end_at_zero():
    module = exact_ddpm(MIXTURE)
    ts = grids.discrete_levels(module.level_sigmas, 50)
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 50 and (ts[:-1] > ts[1:]).all()
    assert grids.discrete_levels(module.level_sigmas, 1000).tolist() == list(range(999, -1, -1))
    with pytest.raises(ValueError):
        grids.discrete_levels(module.level_sigmas, 0)
    # what DDIM visits is those levels' sigmas, then 0 (a step to 0 returns the denoiser's x0)
    torch.testing.assert_close(module.grid("ddim", 50), grids.append_zero(module.level_sigmas[ts]), rtol=0, atol=0)


@pytest.mark.parametrize("spacing", ["uniform", "quadratic", "karras"])
@pytest.mark.parametrize("T", [20, 1000])
def test_every_ddim_spacing_gives_steps_strictly_decreasing_levels_from_T_minus_1_to_0(spacing, T):
    module = exact_ddpm(MIXTURE, "linear" if T == 1000 else "cosine", T)
    for steps in sorted({1, 2, 3, 10, T // 2, T - 1, T}):
        ts = grids.discrete_levels(module.level_sigmas, steps, spacing)
        assert len(ts) == steps and ts[0] == T - 1 and (steps == 1 or ts[-1] == 0), (steps, ts.tolist())
        assert (ts[:-1] > ts[1:]).all(), (steps, ts.tolist())
        assert module.grid_levels("ddim", steps, spacing) == ts.tolist()  # the levels DDPM.sample visits
    assert grids.discrete_levels(module.level_sigmas, T, spacing).tolist() == list(range(T - 1, -1, -1))


def test_every_spacing_matches_its_definition():
    table = exact_ddpm(MIXTURE).level_sigmas
    frac = [1 - k / 9 for k in range(10)]
    assert grids.discrete_levels(table, 10, "uniform").tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert grids.discrete_levels(table, 10).tolist() == [round(999 * f) for f in frac]  # uniform is the default
    assert grids.discrete_levels(table, 10, "quadratic").tolist() == [round(999 * f * f) for f in frac]
    # karras: each level is the one whose sigma is nearest (in log) to Karras et al.'s rho = 7 grid
    # the table is sigma_t = sqrt(1 - abar_t) / sqrt(abar_t), from the very buffers q_sample uses
    schedule = exact_ddpm(MIXTURE).schedule
    log_sigma = schedule.sqrt_one_minus_alphas_cumprod.double().log() - schedule.sqrt_alphas_cumprod.double().log()
    torch.testing.assert_close(table.log(), log_sigma, rtol=1e-12, atol=1e-12)
    lo, hi = math.exp(log_sigma[0] / 7), math.exp(log_sigma[999] / 7)
    ts = grids.discrete_levels(table, 10, "karras").tolist()
    for f, t in zip(frac, ts):
        target = 7 * math.log(lo + f * (hi - lo))
        assert (log_sigma[t] - target).abs() <= (log_sigma - target).abs().min() + 1e-12, (f, t)
    assert ts[-2] < 50 and ts[1] > 900, ts  # rho = 7 puts steps at both ends, few in the middle
    # karras is placed by the schedule's sigmas (the old ddim_timesteps refused it without the schedule; the table
    # is now its first argument): on the cosine table the levels differ, uniform and quadratic do not
    cosine = exact_ddpm(MIXTURE, "cosine").level_sigmas
    assert grids.discrete_levels(cosine, 10, "karras").tolist() != ts
    for spacing in ("uniform", "quadratic"):
        assert grids.discrete_levels(cosine, 10, spacing).tolist() == grids.discrete_levels(table, 10, spacing).tolist()
    with pytest.raises(ValueError, match="spacing must be one of"):
        grids.discrete_levels(table, 10, "log")
    with pytest.raises(ValueError, match="ddim_spacing must be one of"):
        exact_ddpm(MIXTURE).sample(2, sampler="ddim", steps=10, ddim_spacing="log")


@pytest.mark.parametrize("spacing", ["quadratic", "karras"])
def test_ddim_on_other_spacings_reproduces_the_mixture(spacing):
    module = exact_ddpm(MIXTURE)
    g = torch.Generator().manual_seed(1)
    x = module.sample(N, sampler="ddim", steps=50, ddim_spacing=spacing, generator=g)
    check_matches_mixture(x, MIXTURE, extra_rel_std=0.05)


def test_karras_spacing_on_a_cosine_schedule_is_refused_where_it_crowds_the_top():
    """Cosine T = 1000 tops at sigma 2e4: Karras' rho = 7 grid put 13 of 20 levels on its first 13 steps (and DPM-Solver's
    error stopped falling with more steps), so the pairing is refused; a linear schedule (top 157) keeps it."""
    from functools import partial

    from lightning_modules.nets import MLP

    cosine = DDPM(MLP((2,), hidden=8, depth=1), partial(torch.optim.Adam), data_shape=(2,), schedule="cosine")
    with pytest.raises(ConfigError, match=r"ddim_spacing=karras on this schedule \(top sigma 2\.03e\+04 > 1000"):
        cosine.sample(2, sampler="dpmpp_2m", steps=20, ddim_spacing="karras")
    with pytest.raises(ConfigError, match=r"model\.sampling\.options\.ddim_spacing=karras on this schedule"):
        DDPM(MLP((2,), hidden=8, depth=1), partial(torch.optim.Adam), data_shape=(2,), schedule="cosine", sampling={"options": {"ddim_spacing": "karras"}})
    linear = exact_ddpm(MIXTURE)
    assert linear.grid_levels("dpmpp_2m", 20, "karras")[0] == 999


def test_ddim_eta0_is_deterministic_and_eta1_is_not():
    module = exact_ddpm(MIXTURE, num_timesteps=100)
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(3))
    a = module.sample(16, sampler="ddim", steps=20, eta=0.0, x_T=x_T, generator=torch.Generator().manual_seed(4))
    b = module.sample(16, sampler="ddim", steps=20, eta=0.0, x_T=x_T, generator=torch.Generator().manual_seed(5))
    c = module.sample(16, sampler="ddim", steps=20, eta=1.0, x_T=x_T, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-2


def test_ddim_over_every_level_with_eta_one_is_ancestral_with_the_posterior_variance():
    """DDIM's eta = 1 is DDPM's posterior step (Song et al. 2021, eq. 16); on all T levels it is the ancestral sampler
    with variance='posterior', bitwise, and not the one with Ho et al.'s larger beta_t."""
    module = exact_ddpm(MIXTURE, num_timesteps=100)
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(7))
    ddim = module.sample(64, sampler="ddim", steps=100, eta=1.0, x_T=x_T, generator=torch.Generator().manual_seed(8))
    posterior = module.sample(64, sampler="ancestral", variance="posterior", x_T=x_T, generator=torch.Generator().manual_seed(8))
    beta = module.sample(64, sampler="ancestral", variance="beta", x_T=x_T, generator=torch.Generator().manual_seed(8))
    assert torch.equal(ddim, posterior)
    assert (beta - posterior).abs().max() > 1e-3


def gaussian_ddpm(schedule_name: str, T: int, s: float) -> DDPM:
    """A DDPM with the exact eps for 1-D data N(0, s^2): x_t ~ N(0, abar s^2 + 1 - abar), score = -x_t / var."""
    module = DDPM(nn.Identity(), None, data_shape=(1,), num_timesteps=T, schedule=schedule_name)
    module.net = ExactDDPMNet(module.schedule, lambda x, a, sd, cond: -x / (a[:, None] ** 2 * s * s + sd[:, None] ** 2))
    return module


@pytest.mark.parametrize("schedule_name,T", [("linear", 1000), ("cosine", 100)])
def test_dpm_solver_2m_is_closer_to_the_exact_ode_map_than_ddim_at_the_same_nfe(schedule_name, T):
    """For Gaussian data the probability-flow ODE is linear: x_T = 1 lands at s / sqrt(abar_T s^2 + 1 - abar_T).
    The second-order solver must cut DDIM's (first-order) error several times at 10 steps; a wrong extrapolation
    coefficient (sign or ratio) makes it worse than DDIM instead.

    dpmpp_2m now drops to first order on a step whose ratio r = h_prev / h is below min_ratio (0.5 by default):
    min_ratio=0 is the always-second-order solver this test checked before, held to the same factor on both
    spacings. On the quadratic grid every r is >= 0.5, so the default is that very solver. On the uniform grid the
    step from level 111 to level 0 has r = log(sigma_222 / sigma_111) / log(sigma_111 / sigma_0) ~ 0.14 (linear),
    so the default takes a first-order step there, and a first-order 2M step is exactly DDIM's (Euler's)
    x' = (s' / s) x + (1 - s' / s) D: the default is 2M down to level 111 followed by DDIM from level 111 on."""
    s = 0.1
    module = gaussian_ddpm(schedule_name, T, s)
    x_T = torch.tensor([[1.0]])
    a_T = module.schedule.alphas_cumprod[-1].double()
    exact = (s / (a_T * s * s + 1 - a_T).sqrt()).item()
    for spacing in ("uniform", "quadratic"):
        ddim = module.sample(1, sampler="ddim", steps=10, ddim_spacing=spacing, x_T=x_T).item()
        dpm = module.sample(1, sampler="dpmpp_2m", steps=10, ddim_spacing=spacing, x_T=x_T, min_ratio=0.0).item()
        assert abs(dpm - exact) < abs(ddim - exact) / 1.8, (spacing, exact, ddim, dpm)
    quad = module.sample(1, sampler="dpmpp_2m", steps=10, ddim_spacing="quadratic", x_T=x_T).item()
    assert quad == module.sample(1, sampler="dpmpp_2m", steps=10, ddim_spacing="quadratic", x_T=x_T, min_ratio=0.0).item()
    assert abs(quad - exact) < 0.1 * s, (exact, quad)
    # the default on the uniform grid, composed by hand as derived above
    levels = module.grid_levels("ddim", 10, "uniform")
    table = module.level_sigmas
    h = [math.log(table[a] / table[b]) for a, b in zip(levels[:-1], levels[1:])]
    first_order = [k for k in range(1, len(h)) if h[k - 1] / h[k] < 0.5]
    assert first_order == [len(h) - 1], (levels, h)  # only the step to level 0
    x = module.to_ve(x_T.double(), float(table[levels[0]]))
    denoiser = lambda v, sigma: module.denoise(v, sigma)  # noqa: E731
    x = samplers.get("dpmpp_2m").fn(denoiser, x, table[levels[:-1]], min_ratio=0.0)
    x = samplers.get("ddim").fn(denoiser, x, grids.append_zero(table[levels[-2:]]))
    default = module.sample(1, sampler="dpmpp_2m", steps=10, ddim_spacing="uniform", x_T=x_T.double())
    torch.testing.assert_close(default, x, rtol=1e-12, atol=0)


def test_dpm_solver_2m_reproduces_the_mixture_and_uses_one_eval_per_step():
    module = exact_ddpm(MIXTURE)
    calls, levels = [], []
    module.net.register_forward_hook(lambda net, args, out: calls.append(1))  # every net evaluation
    g = torch.Generator().manual_seed(6)
    x, nfe = module.sample(N, sampler="dpmpp_2m", steps=25, ddim_spacing="quadratic", generator=g, return_nfe=True,
                           callback=lambda i, sigma, x: levels.append(int(module.level_of(sigma)[0])))
    assert len(calls) == 25 and nfe == 25 and module.nfe("dpmpp_2m", 25) == 25
    assert levels == grids.discrete_levels(module.level_sigmas, 25, "quadratic").tolist()
    check_matches_mixture(x, MIXTURE, extra_rel_std=0.05)
