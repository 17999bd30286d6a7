"""Noise paths (lightning_modules/paths.py): each path's own identities, exactly or to float64 precision."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.paths import AffinePath, CosinePath, LinearPath, make_path
from lightning_modules.sde import make_sde
from difflab.errors import ConfigError

PATHS = {"linear": LinearPath(), "cosine": CosinePath(), "vp": make_sde("vp"), "subvp": make_sde("subvp")}
T = torch.linspace(0.01, 0.99, 41, dtype=torch.float64)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_the_velocity_is_the_time_derivative_of_the_path_and_x0_inverts_it(name):
    path = PATHS[name]
    g = torch.Generator().manual_seed(0)
    x0, n = torch.randn(41, 3, generator=g, dtype=torch.float64), torch.randn(41, 3, generator=g, dtype=torch.float64)
    t = T.clone().requires_grad_(True)
    x_t = path.perturb(x0, t, n)
    ddt = torch.stack([torch.autograd.grad(x_t[:, j].sum(), t, retain_graph=True)[0] for j in range(3)], 1)
    v = path.velocity_target(x0, T, n)
    torch.testing.assert_close(v, ddt)  # d x_t / dt along the path, by autograd
    torch.testing.assert_close(path.x0_from_velocity(x_t.detach(), T, v), x0)


@pytest.mark.parametrize("name", sorted(PATHS))
def test_ve_sigma_is_sigma_over_alpha_and_t_of_ve_sigma_inverts_it(name):
    path = PATHS[name]
    alpha, sigma = path.marginal(T)
    torch.testing.assert_close(path.ve_sigma(T), sigma / alpha)
    torch.testing.assert_close(path.t_of_ve_sigma(path.ve_sigma(T)), T)
    s = float(path.ve_sigma(T[20:21]))
    assert path.mean_scale(s) == pytest.approx(float(alpha[20]), rel=1e-12)
    x = torch.randn(4, 2, dtype=torch.float64)
    torch.testing.assert_close(path.to_ve(x, s), x / float(alpha[20]))
    torch.testing.assert_close(path.from_ve(path.to_ve(x, s), torch.full((4,), s, dtype=torch.float64)), x)
    assert path.prior_ve_std(s) == pytest.approx(path.prior_std() / float(alpha[20]), rel=1e-12)


def test_the_linear_paths_closed_forms_equal_the_generic_ones():
    """LinearPath writes its VE conversions as 1 + sigma (bitwise what flow matching always did); the generic
    AffinePath formulas on the same marginal agree to float64 precision."""
    generic, linear = AffinePath(), LinearPath()
    generic.marginal, generic.d_marginal, generic.t_of_ve_sigma = linear.marginal, linear.d_marginal, linear.t_of_ve_sigma
    x = torch.randn(41, 2, dtype=torch.float64)
    v = torch.randn(41, 2, dtype=torch.float64)
    torch.testing.assert_close(generic.x0_from_velocity(x, T, v), linear.x0_from_velocity(x, T, v), rtol=1e-14, atol=1e-14)
    for s in (1e-4, 0.5, 3.0, 999.0):
        assert generic.prior_ve_std(s) == pytest.approx(linear.prior_ve_std(s), rel=1e-12)
        assert generic.mean_scale(s) == pytest.approx(linear.mean_scale(s), rel=1e-12)


def test_the_cosine_path_preserves_variance_and_spans_all_noise_levels():
    alpha, sigma = CosinePath().marginal(T)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(T))
    assert float(CosinePath().ve_sigma(torch.tensor(0.999, dtype=torch.float64))) == pytest.approx(1 / math.tan(0.0005 * math.pi))


def test_an_unknown_path_is_one_line():
    with pytest.raises(ConfigError, match=r"model.path='cosin' is not a path: use one of linear, cosine"):
        make_path("cosin")


def test_the_ve_path_is_the_identity_and_ddpms_path_reads_its_table():
    """VE methods' coordinates are the VE form; DDPM's path converts with alpha = 1 / sqrt(1 + sigma^2), which on
    its trained levels is sqrt(abar_t), and its training draw is the table's q_sample."""
    from functools import partial

    from lightning_modules.ddpm import DDPM
    from lightning_modules.nets import MLP
    from lightning_modules.paths import VE_PATH

    x = torch.randn(5, 2, dtype=torch.float64)
    assert VE_PATH.to_ve(x, 3.0) is x and VE_PATH.prior_ve_std(3.0) == 3.0 and VE_PATH.mean_scale(3.0) == 1.0
    ddpm = DDPM(MLP((2,), hidden=8, depth=1), partial(torch.optim.Adam), data_shape=(2,), num_timesteps=50)
    abar = ddpm.schedule.alphas_cumprod.double()
    sigma = ((1 - abar) / abar).sqrt()
    for t in (0, 17, 49):
        assert ddpm.path.mean_scale(float(sigma[t])) == pytest.approx(float(abar[t].sqrt()), rel=1e-12)
        assert ddpm.prior_std(float(sigma[t])) == pytest.approx(float(1 / abar[t].sqrt()), rel=1e-12)
    s = sigma[[3, 40, 12, 0, 49]]
    torch.testing.assert_close(ddpm.path.from_ve(ddpm.path.to_ve(x, s), s), x)
    t, noise = torch.tensor([0, 10, 20, 30, 49]), torch.randn(5, 2)
    torch.testing.assert_close(ddpm.path.perturb(x.float(), t, noise), ddpm.schedule.q_sample(x.float(), t, noise), rtol=0, atol=0)
