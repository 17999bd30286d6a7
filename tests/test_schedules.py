"""Forward process and schedules against their closed forms."""

import math

import pytest
import torch

from lightning_modules.schedules import DiscreteSchedule, cosine_betas, linear_betas, make_betas


def test_linear_alphas_cumprod_is_the_product_of_one_minus_beta():
    betas = linear_betas(1000, 1e-4, 0.02)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    expected = torch.tensor([math.prod(1 - b for b in betas[: t + 1].tolist()) for t in (0, 9, 99, 499, 999)], dtype=torch.float64)
    got = DiscreteSchedule(betas).alphas_cumprod.double()[[0, 9, 99, 499, 999]]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-9)
    # Ho et al.'s schedule ends almost at pure noise: abar_T ~ 4e-5
    assert 1e-5 < got[-1].item() < 1e-4


def test_cosine_alphas_cumprod_follows_nichol_dhariwal():
    T, s = 1000, 0.008
    sched = DiscreteSchedule(cosine_betas(T))
    t = torch.tensor([1, 10, 250, 500, 900], dtype=torch.float64)
    f = lambda u: torch.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    expected = f(t) / f(torch.tensor(0.0, dtype=torch.float64))
    # index t-1 in the code is the paper's step t
    torch.testing.assert_close(sched.alphas_cumprod.double()[t.long() - 1], expected, rtol=1e-5, atol=1e-7)
    assert (cosine_betas(T) <= 0.999).all()


def test_unknown_schedule_names_the_options():
    with pytest.raises(ValueError, match="linear.*cosine"):
        make_betas("quadratic", 10)


def test_q_sample_matches_the_closed_form_marginal():
    """x_t = sqrt(abar) x0 + sqrt(1-abar) eps: for fixed x0 the empirical mean/std match the formula."""
    sched = DiscreteSchedule(linear_betas(1000))
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.full((n, 1), 0.7)
    for step in (0, 100, 500, 999):
        t = torch.full((n,), step, dtype=torch.long)
        x_t = sched.q_sample(x0, t, torch.randn(n, 1, generator=g))
        abar = sched.alphas_cumprod[step].item()
        mean, std = math.sqrt(abar) * 0.7, math.sqrt(1 - abar)
        # 5 standard errors of the mean and of the std estimate
        assert abs(x_t.mean().item() - mean) < 5 * std / math.sqrt(n)
        assert abs(x_t.std().item() - std) < 5 * std / math.sqrt(2 * n)


def test_posterior_is_the_gaussian_conditional():
    """q(x_{t-1}|x_t,x0): mean and variance against Bayes' rule for the two Gaussians q(x_t|x_{t-1}) q(x_{t-1}|x0)."""
    betas = linear_betas(1000)  # float64: 1 - abar near t=0 is too ill-conditioned for a float32 reference
    sched = DiscreteSchedule(betas)
    abar = torch.cumprod(1 - betas, 0)
    x0, x_t = torch.tensor([[0.3]]), torch.tensor([[-0.5]])
    for step in (1, 10, 700):
        t = torch.tensor([step])
        a_prev, beta = abar[step - 1], betas[step]
        # prior on x_{t-1}: N(sqrt(a_prev) x0, 1 - a_prev); likelihood x_t ~ N(sqrt(1-beta) x_{t-1}, beta)
        prec = 1 / (1 - a_prev) + (1 - beta) / beta
        var = 1 / prec
        mean = var * (math.sqrt(a_prev) * 0.3 / (1 - a_prev) + math.sqrt(1 - beta) * (-0.5) / beta)
        got_mean, got_var = sched.q_posterior(x0, x_t, t)
        assert got_mean.item() == pytest.approx(mean.item(), rel=1e-4, abs=1e-6)
        assert got_var.item() == pytest.approx(var.item(), rel=1e-4)


def test_prediction_conversions_round_trip():
    sched = DiscreteSchedule(cosine_betas(100))
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    t = torch.randint(0, 100, (8,), generator=g)
    x_t = sched.q_sample(x0, t, eps)
    torch.testing.assert_close(sched.x0_from_eps(x_t, t, eps), x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(sched.eps_from_x0(x_t, t, x0), eps, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(sched.eps_from_v(x_t, t, sched.v_target(x0, t, eps)), eps, atol=1e-5, rtol=1e-5)


def test_betas_must_lie_in_the_open_unit_interval():
    DiscreteSchedule(torch.tensor([0.1, 0.999]))
    for bad in (1.0, 0.0, 1.5):
        with pytest.raises(ValueError, match="betas"):
            DiscreteSchedule(torch.tensor([0.1, bad]))
