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


def test_sampler_with_a_wrong_eps_fails_the_check():
    """Guard against a check that cannot fail: a mixture with other weights must be rejected."""
    schedule = DiscreteSchedule(make_betas("linear", 1000))
    wrong = GaussianMixture(MIXTURE.means, MIXTURE.stds, weights=[0.45, 0.45, 0.1])
    g = torch.Generator().manual_seed(2)
    x = ddim_sample(analytic_eps(wrong, schedule), schedule, torch.randn(N, 2, generator=g), steps=50, generator=g)
    with pytest.raises(AssertionError):
        check_matches_mixture(x, MIXTURE, extra_rel_std=0.05)


def test_ddim_timesteps_start_at_pure_noise_and_end_at_zero():
    ts = ddim_timesteps(1000, 50)
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 50 and (ts[:-1] > ts[1:]).all()
    assert ddim_timesteps(1000, 1000).tolist() == list(range(999, -1, -1))
    with pytest.raises(ValueError):
        ddim_timesteps(1000, 0)


def test_ddim_eta0_is_deterministic_and_eta1_is_not():
    schedule = DiscreteSchedule(make_betas("linear", 100))
    eps_fn = analytic_eps(MIXTURE, schedule)
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(3))
    a = ddim_sample(eps_fn, schedule, x_T, steps=20, eta=0.0, generator=torch.Generator().manual_seed(4))
    b = ddim_sample(eps_fn, schedule, x_T, steps=20, eta=0.0, generator=torch.Generator().manual_seed(5))
    c = ddim_sample(eps_fn, schedule, x_T, steps=20, eta=1.0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-2
