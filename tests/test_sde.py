"""The forward SDEs against closed forms, and their discretizations against the chains they generalize:
VP with N steps <-> DDPM's linear betas, VE <-> SMLD's geometric sigmas (Song et al. 2021, Appendix B)."""

import math

import pytest
import torch

from lightning_modules.schedules import DiscreteSchedule, linear_betas
from lightning_modules.sde import SDE, SubVPSDE, VESDE, VPSDE, make_sde
from samplers.grids import geometric

SDES = {"ve": VESDE(0.01, 50.0), "vp": VPSDE(0.1, 20.0), "subvp": SubVPSDE(0.1, 20.0)}


def closed_form(name: str, t: torch.Tensor):
    """Song et al. 2021, eqs. 29-35, written out again rather than read from the classes."""
    if name == "ve":
        return torch.ones_like(t), 0.01 * (50.0 / 0.01) ** t
    b = 0.1 * t + 0.5 * t**2 * (20.0 - 0.1)
    mean = torch.exp(-0.5 * b)
    return mean, (1 - torch.exp(-b)).sqrt() if name == "vp" else 1 - torch.exp(-b)


@pytest.mark.parametrize("name", SDES)
def test_marginal_matches_the_closed_form(name):
    t = torch.linspace(0.0, 1.0, 51, dtype=torch.float64)
    mean, std = SDES[name].marginal(t)
    want_mean, want_std = closed_form(name, t)
    torch.testing.assert_close(mean, want_mean)
    torch.testing.assert_close(std, want_std)


@pytest.mark.parametrize("name", SDES)
def test_marginal_solves_the_moment_odes_of_drift_and_diffusion(name):
    """For a linear drift f = a(t) x: d mean/dt = a mean, d var/dt = 2 a var + g^2. Integrated with RK4 from
    t=0 (VE starts at variance sigma_min^2, the paper's convention), they must land on `marginal`."""
    sde = SDES[name]
    one = torch.ones(1, 1, dtype=torch.float64)

    def rhs(t, state):
        tt = torch.full((1,), t, dtype=torch.float64)
        a = sde.drift(one, tt).item()
        return torch.stack([a * state[0], 2 * a * state[1] + sde.diffusion(tt).item() ** 2])

    state = torch.tensor([1.0, 0.01**2 if name == "ve" else 0.0], dtype=torch.float64)
    n = 2000
    h = 1.0 / n
    for k in range(n):
        t = k * h
        k1 = rhs(t, state)
        k2 = rhs(t + h / 2, state + h / 2 * k1)
        k3 = rhs(t + h / 2, state + h / 2 * k2)
        k4 = rhs(t + h, state + h * k3)
        state = state + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        if (k + 1) % 500 == 0:
            mean, std = sde.marginal(torch.tensor([t + h], dtype=torch.float64))
            assert abs(state[0].item() - mean.item()) < 1e-6
            assert abs(state[1].sqrt().item() - std.item()) < 1e-6 * max(1.0, std.item())


@pytest.mark.parametrize("name", SDES)
def test_forward_simulation_matches_the_marginal(name):
    """Monte Carlo over the SDE's own discretization with many steps: mean and std within 5 standard errors."""
    sde = SDES[name]
    n, steps = 20000, 1000
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([0.8, -1.5])
    x = x0.expand(n, 2).clone()
    if name == "ve":
        x = x + 0.01 * torch.randn(n, 2, generator=g)
    for i in range(steps):
        t = torch.full((n,), (i + 1) / steps)
        f, G = sde.discretize(x, t, 1.0 / steps)
        x = x + f + G[:, None] * torch.randn(n, 2, generator=g)
    mean, std = sde.marginal(torch.tensor([1.0]))
    se = std.item() / math.sqrt(n)
    assert ((x.mean(0) - mean * x0).abs() < 5 * se + 1e-3 * std).all()
    assert ((x.std(0) - std).abs() < 5 * std / math.sqrt(2 * n) + 5e-3 * std).all()


@pytest.mark.parametrize("N", [1000, 100])
def test_vp_discretization_is_ddpm_with_its_linear_betas(N):
    """beta_i = beta_min/N + i/(N(N-1)) (beta_max - beta_min), i.e. Ho et al.'s 1e-4..0.02 for N=1000."""
    sde = VPSDE(0.1, 20.0)
    t = torch.arange(N, dtype=torch.float64) / (N - 1)
    x = torch.ones(N, 1, dtype=torch.float64)
    f, G = sde.discretize(x, t, 1.0 / N)
    betas = linear_betas(N, 0.1 / N, 20.0 / N)
    torch.testing.assert_close(G**2, betas)
    torch.testing.assert_close((x + f)[:, 0], (1 - betas).sqrt())
    if N == 1000:
        torch.testing.assert_close(betas, linear_betas(1000, 1e-4, 0.02))
        # and the whole chain's log abar_N = sum log(1 - beta_i) is the SDE's -int beta up to the second-order
        # terms: -beta - beta^2 <= log(1 - beta) <= -beta for beta <= 1/2; sum beta_i = int beta exactly (beta is linear)
        log_abar = torch.log(DiscreteSchedule(betas).alphas_cumprod[-1].double())
        mean, _ = sde.marginal(torch.tensor([1.0], dtype=torch.float64))
        gap = (2 * mean.log() - log_abar).abs().item()
        assert gap < (betas**2).sum().item()


def test_ve_discretization_is_smld_with_its_geometric_sigmas():
    """x_i = x_{i-1} + sqrt(sigma_i^2 - sigma_{i-1}^2) z on SMLD's sigma_min .. sigma_max, sigma_{-1} = 0."""
    N = 10
    sde = VESDE(0.01, 50.0)
    t = torch.arange(N, dtype=torch.float64) / (N - 1)
    _, G = sde.discretize(torch.zeros(N, 1, dtype=torch.float64), t, 1.0 / (N - 1))
    smld = geometric(50.0, 0.01, N).flip(0)  # ascending
    torch.testing.assert_close(sde.sigma(t), smld)
    torch.testing.assert_close(G**2, smld**2 - torch.cat([smld.new_zeros(1), smld[:-1] ** 2]))
    # the variances add up: after the chain, the marginal std is sigma_max
    assert abs((G**2).sum().sqrt().item() - 50.0) < 1e-9


@pytest.mark.parametrize("name", SDES)
def test_ve_sigma_is_std_over_mean_scale_and_t_of_ve_sigma_inverts_it(name):
    """The samplers see every SDE in VE form, x / mean_scale = x0 + (std / mean_scale) n: sigma(t) from the closed
    forms above, and t(sigma) its inverse over (0, 1] (what the VE-form denoiser feeds the net)."""
    sde = SDES[name]
    t = torch.linspace(1e-5, 1.0, 101, dtype=torch.float64)
    mean, std = closed_form(name, t)
    torch.testing.assert_close(sde.ve_sigma(t), std / mean)
    torch.testing.assert_close(sde.t_of_ve_sigma(sde.ve_sigma(t)), t, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", SDES)
def test_reverse_sde_and_probability_flow_are_derived_once_from_f_and_g(name):
    sde = SDES[name]
    for method in ("reverse_drift", "reverse_diffusion", "reverse", "reverse_discretize"):
        assert method not in type(sde).__dict__, f"{type(sde).__name__} overrides {method}"
    g = torch.Generator().manual_seed(1)
    x, score = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    t = torch.rand(4, generator=g)
    f, diff = sde.drift_diffusion(x, t)
    torch.testing.assert_close(sde.reverse_drift(x, t, score), f - diff[:, None] ** 2 * score)
    torch.testing.assert_close(sde.reverse_drift(x, t, score, probability_flow=True), f - 0.5 * diff[:, None] ** 2 * score)
    drift, rev_diff = sde.reverse(lambda y, s: score, probability_flow=False).drift_diffusion(x, t)
    torch.testing.assert_close(drift, f - diff[:, None] ** 2 * score)
    torch.testing.assert_close(rev_diff, diff)
    assert (sde.reverse(lambda y, s: score, probability_flow=True).drift_diffusion(x, t)[1] == 0).all()


@pytest.mark.parametrize("name", SDES)
def test_prior_sample_and_log_density(name):
    sde = SDES[name]
    z = sde.prior_sample((20000, 2), torch.Generator().manual_seed(2))
    assert abs(z.std().item() - sde.prior_std()) < 5 * sde.prior_std() / math.sqrt(2 * z.numel())
    want = torch.distributions.Normal(0.0, sde.prior_std()).log_prob(z[:5]).sum(1)
    torch.testing.assert_close(sde.prior_logp(z[:5]), want)
    # the prior is what the forward process reaches at T (VP: mean_scale(1) ~ 0.007, std ~ 1)
    mean, std = sde.marginal(torch.tensor([1.0]))
    assert mean.item() < 0.01 or name == "ve"
    assert abs(std.item() - sde.prior_std()) < 0.01 * sde.prior_std()


def test_make_sde_names_and_errors():
    assert isinstance(make_sde("ve", sigma_max=10.0), VESDE) and make_sde("ve", sigma_max=10.0).sigma_max == 10.0
    assert type(make_sde("vp")) is VPSDE and type(make_sde("subvp")) is SubVPSDE
    assert issubclass(SubVPSDE, SDE)
    with pytest.raises(ValueError, match="model.sde"):
        make_sde("vpp")
    with pytest.raises(ValueError):
        VESDE(1.0, 0.5)


def test_defaults_are_song_et_al_s_and_the_bounds_are_strict():
    ve, vp = VESDE(), VPSDE()
    assert (ve.sigma_min, ve.sigma_max, vp.beta_min, vp.beta_max) == (0.01, 50.0, 0.1, 20.0)
    with pytest.raises(ValueError):
        VPSDE(beta_min=0.0)


def test_prior_sample_draws_from_its_generator_alone_and_defaults_to_the_cpu():
    sde = VESDE()
    a, b = (sde.prior_sample((4000, 2), generator=torch.Generator().manual_seed(s)) for s in (0, 0))
    assert torch.equal(a, b) and not torch.equal(a, sde.prior_sample((4000, 2), generator=torch.Generator().manual_seed(1)))
    x = sde.prior_sample((4000, 2))
    assert x.device.type == "cpu" and abs(x.std().item() / 50.0 - 1) < 0.05
