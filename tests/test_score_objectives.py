"""dsm, ism (exact trace) and ssm as functions of a score: their values where they are known in closed
form, and each one learning the score of a 2-D Gaussian, compared with the true score at data points."""

import math

import pytest
import torch
from torch import nn

from lightning_modules.score_objectives import ISM_MAX_DIM, dsm, ism, ssm

MEAN = torch.tensor([1.0, -0.5])
COV = torch.tensor([[1.0, 0.6], [0.6, 0.8]])
DSM_SIGMA = 0.1


def gaussian_score(x: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    return -(x - MEAN) @ torch.linalg.inv(cov)  # cov is symmetric


def sample_data(n: int, generator: torch.Generator) -> torch.Tensor:
    return MEAN + torch.randn(n, 2, generator=generator) @ torch.linalg.cholesky(COV).T


def test_ism_of_the_true_score_of_a_standard_normal_is_minus_half_the_dimension():
    # s(x) = -x: tr(grad s) = -D and E[1/2 ||x||^2] = D/2, so the objective is -D/2 exactly in expectation.
    x = torch.randn(20000, 3, generator=torch.Generator().manual_seed(0))
    value = ism(lambda y: -y, x)
    assert abs(value.mean().item() + 1.5) < 5 * value.std().item() / math.sqrt(len(x))
    # and a wrong score, s(x) = -2x, scores worse: -2D + 2 E||x||^2 = 0
    assert ism(lambda y: -2 * y, x).mean().item() > value.mean().item() + 1.0


def nonlinear_score(y: torch.Tensor) -> torch.Tensor:
    return torch.stack([-y[:, 0] ** 3 + torch.sin(y[:, 1]), -y[:, 1] * y[:, 0] ** 2 - y[:, 1]], dim=1)


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_ssm_is_an_unbiased_estimate_of_ism(probe):
    """E_v[v^T J v] = tr(J) for E[v v^T] = I: averaged over many projections SSM-VR equals ISM per sample."""
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    exact = ism(nonlinear_score, x)
    g = torch.Generator().manual_seed(2)
    n = 4000
    sliced = ssm(nonlinear_score, x, n_projections=n, probe=probe, generator=g)
    # Var(v^T J v) <= 2 ||J||_F^2 (Gaussian; less for Rademacher): 6 standard errors per sample
    jac = torch.stack([torch.autograd.functional.jacobian(lambda v: nonlinear_score(v[None])[0], xi) for xi in x])
    tol = 6 * torch.sqrt(2 * (jac**2).sum((1, 2)) / n) + 1e-4
    assert ((sliced - exact).abs() <= tol).all()


def test_ism_refuses_high_dimensional_data_and_points_to_ssm():
    x = torch.zeros(2, ISM_MAX_DIM + 1)
    with pytest.raises(ValueError, match="ssm"):
        ism(lambda y: -y, x)


def test_dsm_is_zero_only_for_the_exact_noise_score_and_weighs_by_sigma_squared():
    x = torch.zeros(5, 2)
    noise = torch.randn(5, 2, generator=torch.Generator().manual_seed(3))
    sigma = torch.full((5,), 0.5)
    # The conditional score of the noise kernel, -(x~ - x)/sigma^2, is the regression target: zero loss.
    assert dsm(lambda y, s: -(y - x) / s[:, None] ** 2, x, sigma, noise).abs().max() < 1e-6
    # A zero score costs 1/2 ||z||^2 whatever sigma is: the sigma^2 weighting makes levels comparable.
    torch.testing.assert_close(dsm(lambda y, s: torch.zeros_like(y), x, sigma, noise), 0.5 * (noise**2).sum(1))


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 2))


def train(objective: str, steps: int = 800) -> nn.Module:
    net = small_net()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(4)
    for _ in range(steps):
        x = sample_data(256, g)
        if objective == "dsm":
            sigma = torch.full((x.shape[0],), DSM_SIGMA)
            loss = dsm(lambda y, s: net(y), x, sigma, torch.randn(x.shape, generator=g)) / DSM_SIGMA**2
        elif objective == "ism":
            loss = ism(net, x)
        else:
            loss = ssm(net, x, n_projections=1, generator=g)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        sched.step()
    return net


@pytest.mark.parametrize("objective", ["dsm", "ism", "ssm"])
def test_objective_learns_the_score_of_a_2d_gaussian(objective):
    net = train(objective)
    # dsm learns the score of the data perturbed by sigma; ism and ssm the data's own.
    cov = COV + DSM_SIGMA**2 * torch.eye(2) if objective == "dsm" else COV
    x = sample_data(4000, torch.Generator().manual_seed(5))  # where the data are: the objectives weigh by p(x)
    with torch.no_grad():
        err = ((net(x) - gaussian_score(x, cov)) ** 2).sum(1).mean() / (gaussian_score(x, cov) ** 2).sum(1).mean()
    assert err < 0.03, f"{objective}: relative squared error {err:.4f}"
    # The check can fail: the score of a Gaussian with another covariance is rejected.
    wrong = ((gaussian_score(x, 1.5 * cov) - gaussian_score(x, cov)) ** 2).sum(1).mean() / (gaussian_score(x, cov) ** 2).sum(1).mean()
    assert wrong > 0.03
