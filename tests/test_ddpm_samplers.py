"""DDPM samplers with the exact eps of a Gaussian mixture must reproduce the mixture.

With eps(x_t, t) = -sqrt(1 - abar_t) * grad log q_t(x_t) known in closed form,
sampling error comes only from the sampler: tolerances are standard errors of
the sample size (and, for few-step DDIM, a stated discretisation allowance).
"""

import math

import pytest
import torch

from lightning_modules.analytic import GaussianMixture
from lightning_modules.ddpm import ancestral_sample, ddim_sample, ddim_timesteps
from lightning_modules.schedules import DiscreteSchedule, make_betas

MIXTURE = GaussianMixture(means=[[-2.0, 0.0], [2.0, 0.0], [0.0, 3.0]], stds=[0.3, 0.5, 0.4], weights=[0.2, 0.3, 0.5])
N = 4000


def analytic_eps(mixture: GaussianMixture, schedule: DiscreteSchedule):
    def eps_fn(x, t):
        abar = schedule.alphas_cumprod[t].double()
        return -(1 - abar).sqrt()[:, None].float() * mixture.score(x, abar.sqrt(), (1 - abar).sqrt())

    return eps_fn


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
    schedule = DiscreteSchedule(make_betas(schedule_name, 1000))
    g = torch.Generator().manual_seed(0)
    x = ancestral_sample(analytic_eps(MIXTURE, schedule), schedule, torch.randn(N, 2, generator=g), variance=variance, generator=g)
    check_matches_mixture(x, MIXTURE)


@pytest.mark.parametrize("steps,eta,allowance", [(1000, 0.0, 0.0), (50, 0.0, 0.05), (100, 1.0, 0.05)])
def test_ddim_reproduces_the_mixture(steps, eta, allowance):
    schedule = DiscreteSchedule(make_betas("linear", 1000))
    g = torch.Generator().manual_seed(1)
    x = ddim_sample(analytic_eps(MIXTURE, schedule), schedule, torch.randn(N, 2, generator=g), steps=steps, eta=eta, generator=g)
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
    schedule = DiscreteSchedule(make_betas("linear", 1000))
    g = torch.Generator().manual_seed(2)
    x = ddim_sample(analytic_eps(NEAR_MISSES[wrong], schedule), schedule, torch.randn(N, 2, generator=g), steps=1000, generator=g)
    with pytest.raises(AssertionError):
        check_matches_mixture(x, MIXTURE)


def test_ddim_timesteps_start_at_pure_noise_and_end_at_zero():
    ts = ddim_timesteps(1000, 50)
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 50 and (ts[:-1] > ts[1:]).all()
    assert ddim_timesteps(1000, 1000).tolist() == list(range(999, -1, -1))
    with pytest.raises(ValueError):
        ddim_timesteps(1000, 0)


@pytest.mark.parametrize("spacing", ["uniform", "quadratic", "karras"])
@pytest.mark.parametrize("T", [20, 1000])
def test_every_ddim_spacing_gives_steps_strictly_decreasing_levels_from_T_minus_1_to_0(spacing, T):
    schedule = DiscreteSchedule(make_betas("linear" if T == 1000 else "cosine", T))
    for steps in sorted({1, 2, 3, 10, T // 2, T - 1, T}):
        ts = ddim_timesteps(T, steps, spacing, schedule)
        assert len(ts) == steps and ts[0] == T - 1 and (steps == 1 or ts[-1] == 0), (steps, ts.tolist())
        assert (ts[:-1] > ts[1:]).all(), (steps, ts.tolist())
    assert ddim_timesteps(T, T, spacing, schedule).tolist() == list(range(T - 1, -1, -1))


def test_every_spacing_matches_its_definition():
    schedule = DiscreteSchedule(make_betas("linear", 1000))
    frac = [1 - k / 9 for k in range(10)]
    assert ddim_timesteps(1000, 10, "uniform").tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert ddim_timesteps(1000, 10).tolist() == [round(999 * f) for f in frac]  # uniform is the default
    assert ddim_timesteps(1000, 10, "quadratic").tolist() == [round(999 * f * f) for f in frac]
    # karras: each level is the one whose sigma is nearest (in log) to Karras et al.'s rho = 7 grid
    abar = schedule.alphas_cumprod.double()
    log_sigma = 0.5 * torch.log((1 - abar) / abar)
    lo, hi = math.exp(log_sigma[0] / 7), math.exp(log_sigma[999] / 7)
    ts = ddim_timesteps(1000, 10, "karras", schedule).tolist()
    for f, t in zip(frac, ts):
        target = 7 * math.log(lo + f * (hi - lo))
        assert (log_sigma[t] - target).abs() <= (log_sigma - target).abs().min() + 1e-12, (f, t)
    assert ts[-2] < 50 and ts[1] > 900, ts  # rho = 7 puts steps at both ends, few in the middle
    with pytest.raises(ValueError, match="pass the schedule"):
        ddim_timesteps(1000, 10, "karras")
    with pytest.raises(ValueError, match="ddim_spacing must be one of"):
        ddim_timesteps(1000, 10, "log")


@pytest.mark.parametrize("spacing", ["quadratic", "karras"])
def test_ddim_on_other_spacings_reproduces_the_mixture(spacing):
    schedule = DiscreteSchedule(make_betas("linear", 1000))
    g = torch.Generator().manual_seed(1)
    x = ddim_sample(analytic_eps(MIXTURE, schedule), schedule, torch.randn(N, 2, generator=g), steps=50, generator=g, spacing=spacing)
    check_matches_mixture(x, MIXTURE, extra_rel_std=0.05)


def test_ddim_eta0_is_deterministic_and_eta1_is_not():
    schedule = DiscreteSchedule(make_betas("linear", 100))
    eps_fn = analytic_eps(MIXTURE, schedule)
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(3))
    a = ddim_sample(eps_fn, schedule, x_T, steps=20, eta=0.0, generator=torch.Generator().manual_seed(4))
    b = ddim_sample(eps_fn, schedule, x_T, steps=20, eta=0.0, generator=torch.Generator().manual_seed(5))
    c = ddim_sample(eps_fn, schedule, x_T, steps=20, eta=1.0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-2


def gaussian_eps(schedule: DiscreteSchedule, s: float):
    """The exact eps for 1-D data N(0, s^2): x_t ~ N(0, abar s^2 + 1 - abar), eps = sqrt(1 - abar) x_t / var."""

    def eps_fn(x, t):
        abar = schedule.alphas_cumprod[t].double()[:, None]
        return ((1 - abar).sqrt() * x.double() / (abar * s * s + 1 - abar)).float()

    return eps_fn


@pytest.mark.parametrize("schedule_name,T", [("linear", 1000), ("cosine", 100)])
def test_dpm_solver_2m_is_closer_to_the_exact_ode_map_than_ddim_at_the_same_nfe(schedule_name, T):
    """For Gaussian data the probability-flow ODE is linear: x_T = 1 lands at s / sqrt(abar_T s^2 + 1 - abar_T).
    The second-order solver must cut DDIM's (first-order) error several times at 10 steps; a wrong extrapolation
    coefficient (sign or ratio) makes it worse than DDIM instead."""
    from lightning_modules.dpm_solver import dpm_solver_2m_sample

    schedule, s = DiscreteSchedule(make_betas(schedule_name, T)), 0.1
    eps_fn, x_T = gaussian_eps(schedule, s), torch.tensor([[1.0]])
    a_T = schedule.alphas_cumprod[-1].double()
    exact = (s / (a_T * s * s + 1 - a_T).sqrt()).item()
    for spacing in ("uniform", "quadratic"):
        ddim = ddim_sample(eps_fn, schedule, x_T, steps=10, spacing=spacing).item()
        dpm = dpm_solver_2m_sample(eps_fn, schedule, x_T, steps=10, spacing=spacing).item()
        assert abs(dpm - exact) < abs(ddim - exact) / 1.8, (spacing, exact, ddim, dpm)
    quad = dpm_solver_2m_sample(eps_fn, schedule, x_T, steps=10, spacing="quadratic").item()
    assert abs(quad - exact) < 0.1 * s, (exact, quad)


def test_dpm_solver_2m_reproduces_the_mixture_and_uses_one_eval_per_step():
    from lightning_modules.dpm_solver import dpm_solver_2m_sample

    schedule = DiscreteSchedule(make_betas("linear", 1000))
    calls, levels = [], []
    eps = analytic_eps(MIXTURE, schedule)

    def counted(x, t):
        calls.append(1)
        return eps(x, t)

    g = torch.Generator().manual_seed(6)
    x = dpm_solver_2m_sample(counted, schedule, torch.randn(N, 2, generator=g), steps=25, spacing="quadratic",
                             callback=lambda i, t, x: levels.append(int(t[0])))
    assert len(calls) == 25 and levels == ddim_timesteps(1000, 25, "quadratic").tolist()
    check_matches_mixture(x, MIXTURE, extra_rel_std=0.05)
