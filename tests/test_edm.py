"""EDM (Karras et al. 2022): the noise schedule, the preconditioning's unit-variance design, the Heun
sampler against a Gaussian mixture's exact denoiser, the loss's optimum, and the Lightning module.

A Gaussian mixture plus N(0, sigma^2 I) noise is again a mixture, so E[x | x + sigma n] is exact at every
sigma: sampler errors are discretisation only, and tolerances are standard errors of the sample size.
"""

import copy
import math
from functools import partial

import pytest
import torch
from torch import nn

from conftest import assert_loss_optimum_at_zero
from lightning_modules.analytic import GaussianMixture
from lightning_modules.edm import EDM, EDMPrecond
from lightning_modules.nets import MLP
from samplers import grids, ode
from test_ddpm_samplers import MIXTURE, N, check_matches_mixture

SD = 0.5
# 18 Heun steps leave the modes 4-5 % too wide (measured on 1e5 samples); 50 steps leave < 1 %.
HEUN18_ALLOWANCE = 0.08


def exact_denoiser(mixture: GaussianMixture):
    return lambda x, sigma: mixture.denoiser(x, 1.0, sigma.double())


def counted(fn, calls: list):
    return lambda *a, **k: calls.append(1) or fn(*a, **k)


def karras_grid(n, *args, **kw):
    """The samplers' grid: Karras et al.'s n levels and the final step to 0 (samplers take the 0 explicitly)."""
    return grids.append_zero(grids.karras(n, *args, **kw))


# --- schedule ------------------------------------------------------------------------------------------


def test_karras_sigmas_run_from_sigma_max_to_sigma_min_and_rho_1_is_linear():
    s = grids.karras(18)
    assert s.dtype == torch.float64 and s.shape == (18,)
    assert s[0].item() == 80.0 and s[-1].item() == 0.002 and (s[1:] < s[:-1]).all()
    torch.testing.assert_close(grids.karras(7, 0.1, 3.0, rho=1.0), torch.linspace(3.0, 0.1, 7, dtype=torch.float64))
    # rho = 7 crowds the steps at low noise: the median level is far below the arithmetic midpoint
    assert s[9] < 2.0
    assert grids.karras(1).tolist() == [80.0]
    with pytest.raises(ValueError):
        grids.karras(0)
    # the samplers' grid is the same levels with the final step to 0 appended, and passes the grid check
    g = karras_grid(18)
    assert g.dtype == torch.float64 and g.shape == (19,) and g[-1].item() == 0.0
    torch.testing.assert_close(g[:-1], s)
    assert grids.check(g) == g.tolist()


# --- preconditioning -----------------------------------------------------------------------------------


class Recorder(nn.Module):
    """Returns zeros (or a constant) and remembers what the wrapper handed it."""

    def __init__(self, value: float = 0.0):
        super().__init__()
        self.value = value
        self.seen = None

    def forward(self, x, noise_level, cond=None):
        self.seen = (x.clone(), noise_level.clone(), cond)
        return torch.full_like(x, self.value)


def test_precond_with_a_zero_net_is_the_skip_connection_and_feeds_the_net_c_in_x_and_c_noise():
    net = Recorder()
    precond = EDMPrecond(net, SD)
    x = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.5, 2.0, 80.0], dtype=torch.float64)
    total = sigma**2 + SD**2
    out = precond(x, sigma)
    torch.testing.assert_close(out, (SD**2 / total)[:, None, None, None] * x)
    seen_x, seen_level, _ = net.seen
    torch.testing.assert_close(seen_x, x / total.sqrt()[:, None, None, None])
    torch.testing.assert_close(seen_level, sigma.log() / 4)
    # a constant net output enters scaled by c_out = sigma sd / sqrt(sigma^2 + sd^2)
    out1 = EDMPrecond(Recorder(1.0), SD)(x, sigma)
    torch.testing.assert_close(out1 - out, (sigma * SD / total.sqrt())[:, None, None, None].expand_as(x))
    # a scalar sigma means the same sigma for every item
    torch.testing.assert_close(precond(x, 2.0), precond(x, torch.full((4,), 2.0, dtype=torch.float64)))
    with pytest.raises(ValueError, match="sigma"):
        precond(x, torch.ones(3))


@pytest.mark.parametrize("sigma", [0.002, 0.1, 0.5, 3.0, 80.0])
def test_precond_makes_the_net_input_and_its_training_target_unit_variance(sigma):
    """Karras et al. Appendix B.6: Var(c_in y) = 1 and Var((x - c_skip y) / c_out) = 1 for any data of std sd.
    Non-Gaussian data (+-sd) shows only the variance matters; both quantities have mean 0, so the check is
    E[z^2] = 1 within 5 standard errors of the sample mean of z^2."""
    n = 200_000
    g = torch.Generator().manual_seed(0)
    x = SD * (2 * torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) - 1)
    y = x + sigma * torch.randn(n, generator=g, dtype=torch.float64)
    c_skip, c_out, c_in, _ = EDMPrecond(nn.Identity(), SD).coefficients(torch.tensor(sigma, dtype=torch.float64))
    for z in (c_in * y, (x - c_skip * y) / c_out):
        second_moment = (z**2).mean().item()
        assert abs(second_moment - 1) < 5 * (z**2).std().item() / math.sqrt(n), second_moment
    # and the loss weight lambda = (sigma^2 + sd^2) / (sigma sd)^2 is exactly 1 / c_out^2
    torch.testing.assert_close(c_out**-2, torch.tensor((sigma**2 + SD**2) / (sigma * SD) ** 2, dtype=torch.float64))


class BoundaryPrecond(EDMPrecond):
    """A consistency model's coefficients (Song et al. 2023, Appendix C): D(x; sigma_min) = x for any net."""

    def __init__(self, net, sigma_data=SD, sigma_min=0.002):
        super().__init__(net, sigma_data)
        self.sigma_min = sigma_min

    def coefficients(self, sigma):
        _, _, c_in, c_noise = super().coefficients(sigma)
        c_skip = self.sigma_data**2 / ((sigma - self.sigma_min) ** 2 + self.sigma_data**2)
        c_out = (sigma - self.sigma_min) * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()
        return c_skip, c_out, c_in, c_noise


def test_a_subclass_overriding_coefficients_changes_the_wrapper():
    net = MLP((2,), hidden=16, depth=1, emb_dim=8)
    nn.init.normal_(net.fc_out.weight)  # a net that does not output 0
    x = torch.randn(5, 2)
    wrapper = BoundaryPrecond(net)
    torch.testing.assert_close(wrapper(x, 0.002), x)
    assert (wrapper(x, 1.0) - EDMPrecond(net, SD)(x, 1.0)).abs().max() > 1e-3


# --- samplers ------------------------------------------------------------------------------------------


def heun(mixture=MIXTURE, steps=18, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    x_T = 80.0 * torch.randn(N, 2, generator=g)
    return ode.heun(exact_denoiser(mixture), x_T, karras_grid(steps), generator=g, **kw)


@pytest.mark.parametrize("steps,allowance", [(18, HEUN18_ALLOWANCE), (50, 0.0)])
def test_heun_with_the_exact_denoiser_reproduces_the_mixture(steps, allowance):
    check_matches_mixture(heun(steps=steps), MIXTURE, extra_rel_std=allowance)


def test_heun_with_a_wrong_denoiser_fails_the_check():
    """Guard against a check that cannot fail: the denoiser of a mixture with other weights, or shifted means."""
    wrong_weights = GaussianMixture(MIXTURE.means, MIXTURE.stds, weights=[0.45, 0.45, 0.1])
    shifted = GaussianMixture(MIXTURE.means + torch.tensor([0.3, 0.0], dtype=torch.float64), MIXTURE.stds, MIXTURE.weights)
    for wrong in (wrong_weights, shifted):
        with pytest.raises(AssertionError):
            check_matches_mixture(heun(wrong, seed=1), MIXTURE, extra_rel_std=HEUN18_ALLOWANCE)


def test_stochastic_heun_reproduces_the_mixture_at_the_same_nfe():
    calls = []
    g = torch.Generator().manual_seed(2)
    x_T = 80.0 * torch.randn(N, 2, generator=g)
    churn = dict(s_churn=10.0, s_tmin=0.01, s_tmax=10.0)
    x = ode.heun(counted(exact_denoiser(MIXTURE), calls), x_T, karras_grid(18), generator=g, **churn)
    assert len(calls) == 35
    check_matches_mixture(x, MIXTURE, extra_rel_std=HEUN18_ALLOWANCE)
    deterministic = ode.heun(exact_denoiser(MIXTURE), x_T, karras_grid(18))
    torch.testing.assert_close(deterministic, ode.heun(exact_denoiser(MIXTURE), x_T, karras_grid(18), generator=g))
    assert (x - deterministic).abs().mean() > 1e-2


def test_heun_is_second_order_and_euler_first_on_the_exact_gaussian_flow():
    """For N(mu, s^2) the ODE's solution is known: x(0) = mu + s / sqrt(s^2 + sigma_max^2) (x_T - mu). Doubling
    the steps must cut Heun's error ~4x and Euler's ~2x; Heun and Euler cost 2n - 1 and n calls."""
    gaussian = GaussianMixture(means=[[0.5, -1.0]], stds=[0.3])
    x_T = 80.0 * torch.randn(500, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = gaussian.means[0] + 0.3 / math.hypot(0.3, 80.0) * (x_T - gaussian.means[0])
    den = exact_denoiser(gaussian)

    def err(sampler, n):
        return (sampler(den, x_T, karras_grid(n)) - exact).abs().max().item()

    assert err(ode.heun, 20) / err(ode.heun, 40) > 3.5
    assert 1.6 < err(ode.euler, 20) / err(ode.euler, 40) < 2.5
    assert err(ode.heun, 20) < 0.5 * err(ode.euler, 20)
    heun_calls, euler_calls = [], []
    ode.heun(counted(den, heun_calls), x_T, karras_grid(18))
    ode.euler(counted(den, euler_calls), x_T, karras_grid(18))
    assert (len(heun_calls), len(euler_calls)) == (35, 18)


def test_samplers_reject_a_bad_schedule():
    with pytest.raises(ValueError, match="decreasing"):
        ode.heun(exact_denoiser(MIXTURE), torch.zeros(2, 2), torch.tensor([1.0, 2.0, 0.0]))
    # Grids now carry their final 0 explicitly, so [1, 0] is a valid grid (one step to D); what stays refused is a
    # non-positive level anywhere but last, or a negative one.
    for bad in ([1.0, 0.0, 0.0], [2.0, 0.0, -1.0], [1.0, -0.5]):
        with pytest.raises(ValueError, match="positive"):
            ode.euler(exact_denoiser(MIXTURE), torch.zeros(2, 2), torch.tensor(bad))
        with pytest.raises(ValueError, match="positive"):
            ode.heun(exact_denoiser(MIXTURE), torch.zeros(2, 2), torch.tensor(bad))


# --- the module ----------------------------------------------------------------------------------------


class AnalyticNet(nn.Module):
    """The net F that makes the EDM wrapper's D the mixture's exact denoiser, plus `a` times its input: a
    one-parameter family through the optimum. It reads sigma back from c_noise and y from c_in y."""

    def __init__(self, mixture: GaussianMixture, sigma_data: float = SD):
        super().__init__()
        self.mixture, self.sd = mixture, sigma_data
        self.a = nn.Parameter(torch.zeros(()))

    def forward(self, x_in, noise_level, cond=None):
        sigma = (4 * noise_level.double()).exp()[:, None]
        total = sigma**2 + self.sd**2
        y = x_in.double() * total.sqrt()
        exact = self.mixture.denoiser(y, 1.0, sigma[:, 0])
        f = (exact - self.sd**2 / total * y) / (sigma * self.sd / total.sqrt())
        return f.to(x_in.dtype) + self.a * x_in


def edm_module(net, **kw):
    return EDM(net, partial(torch.optim.Adam, lr=1e-3), data_shape=kw.pop("data_shape", (2,)), **kw)


def test_module_with_the_exact_denoiser_and_50_steps_samples_the_mixture_with_no_allowance():
    """The wiring at a step count where Heun's own error is below the check's resolution (< 1 %, measured on
    1e5 samples), so the prior's scale is checked tightly: x_T = 0.9 sigma_max z must fail (see below)."""
    module = edm_module(AnalyticNet(MIXTURE), sampling={"steps": 50})
    check_matches_mixture(module.sample(N, generator=torch.Generator().manual_seed(5)), MIXTURE)
    prior = module.prior_noise
    module.prior_noise = lambda n, g=None: 0.9 * prior(n, g)  # a 10 % prior error, as the issue names it
    with pytest.raises(AssertionError):
        check_matches_mixture(module.sample(N, generator=torch.Generator().manual_seed(5)), MIXTURE)


def test_module_with_the_exact_denoiser_samples_the_mixture_in_35_nfe():
    """Checks the wiring the sampler tests cannot: x_T = sigma_max * noise and the wrapper's algebra."""
    net = AnalyticNet(MIXTURE)
    module = edm_module(net)
    calls = []
    net.forward = counted(net.forward, calls)
    x = module.sample(N, generator=torch.Generator().manual_seed(4))
    assert module.nfe() == 35 == len(calls)
    check_matches_mixture(x, MIXTURE, extra_rel_std=HEUN18_ALLOWANCE)


def test_loss_gradient_vanishes_at_the_exact_denoiser():
    """E[x | y] minimises E lambda ||D - x||^2 at every sigma, so along D + a c_out c_in y the expected
    gradient at a = 0 is 0; away from it the gradient is 2a E[(c_in y)^2] > 0. Each estimate is the mean of
    per-batch gradients, checked against 5 standard errors of that mean."""
    net = AnalyticNet(MIXTURE)
    module = edm_module(net)

    assert_loss_optimum_at_zero(module.loss, net.a, MIXTURE.sample, 0.1, seed=100)


def toy_module(cond_dim=None, **kw):
    torch.manual_seed(0)
    net = MLP((2,), cond_dim=cond_dim, hidden=32, depth=2, emb_dim=16)
    return edm_module(net, cond_dim=cond_dim, **kw)


def test_module_loss_starts_at_one_on_data_of_std_sigma_data_and_trains_on_one_batch():
    module = toy_module()
    # The MLP starts as the zero function, so D = c_skip y and the loss is E[target^2] = 1 (unit-variance target).
    x = SD * torch.randn(4096, 2, generator=torch.Generator().manual_seed(5))
    first = module.loss({"x": x}, torch.Generator().manual_seed(6)).item()
    assert abs(first - 1) < 0.1, first

    batch = {"x": MIXTURE.sample(256, torch.Generator().manual_seed(0))}
    opt = module.optimizer_factory(params=module.parameters())
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731 - the same sigmas and noise every step: one-batch overfit
    first = module.loss(batch, g()).item()
    for _ in range(100):
        opt.zero_grad()
        module.loss(batch, g()).backward()
        opt.step()
    last = module.loss(batch, g()).item()
    assert math.isfinite(first) and last < 0.7 * first, (first, last)


# heun at 5 steps: 2.52 -> 0.169 falls 15x from above the data's scale, a first-order step (samplers.ode.heun_first_order)
@pytest.mark.parametrize("sampler,steps,nfe", [("heun", None, 35), ("heun", 5, 8), ("euler", 6, 6)])
def test_module_samples_with_each_sampler_and_counts_nfe(sampler, steps, nfe):
    module = toy_module()
    calls = []
    module.net.forward = counted(module.net.forward, calls)
    x = module.sample(7, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0))
    assert x.shape == (7, 2) and torch.isfinite(x).all()
    assert module.nfe(sampler, steps) == nfe == len(calls)


def test_module_is_reproducible_clips_and_rejects_unknown_samplers():
    module = toy_module(clip_denoised=True, sampling={"options": {"s_churn": 5.0}})
    a = module.sample(64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, module.sample(64, generator=torch.Generator().manual_seed(1)))
    assert a.abs().max() <= 1.0
    # Every registry sampler of a denoiser now runs on EDM (ddim, pc, ...); refused are names that are no sampler
    # and cm, which needs a consistency function, at sampling and in the config alike.
    with pytest.raises(ValueError, match="not a sampler"):
        module.sample(2, sampler="no_such_sampler")
    with pytest.raises(ValueError, match="sampler=cm is not defined for EDM"):
        module.sample(2, sampler="cm")
    with pytest.raises(ValueError, match="model.sampling.sampler"):
        toy_module(sampling={"sampler": "cm"})
    with pytest.raises(ValueError, match="model.sampling.sampler"):
        toy_module(sampling={"sampler": "no_such_sampler"})


def test_conditional_module_trains_and_samples_with_cond():
    module = toy_module(cond_dim=3)
    nn.init.normal_(module.net.fc_out.weight)  # the MLP starts as the zero function, which no input reaches
    cond = torch.randn(8, 3)
    loss = module.loss({"x": torch.randn(8, 2), "cond": cond})
    loss.backward()
    assert module.net.embed.cond_mlp[0].weight.grad.abs().sum() > 0
    assert module.sample(8, cond=cond, steps=3, generator=torch.Generator().manual_seed(0)).shape == (8, 2)
    with pytest.raises(ValueError, match="conditional"):
        module.sample(8, steps=3)


def test_module_keeps_the_raw_net_and_stores_each_weight_once():
    """Checkpoints, EMA's parameter swap and train.py (n_params, compile, channels_last) use `module.net`."""
    module = toy_module()
    assert isinstance(module.net, MLP) and module.precond.net is module.net
    keys = list(module.state_dict())
    assert keys and all(k.startswith("net.") for k in keys)
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in module.net.parameters())
    # a deep copy (what EMA's AveragedModel makes) denoises with its own copy of the weights
    clone = copy.deepcopy(module)
    assert clone.precond.net is clone.net and clone.net is not module.net
    with torch.no_grad():
        clone.net.fc_out.bias.fill_(1.0)
    x = torch.randn(3, 2)
    assert (clone.denoise(x, 1.0) - module.denoise(x, 1.0)).abs().min() > 0.1
    # replacing the net rebuilds the wrapper around the new one
    module.net = MLP((2,), hidden=8, depth=1, emb_dim=8)
    assert module.precond.net is module.net


def test_module_settings_reach_the_sampler_grid_and_the_optimizer():
    from lightning_modules.lr_schedules import warmup_constant

    module = EDM(MLP((2,), hidden=8, depth=1, emb_dim=8), partial(torch.optim.Adam, lr=1e-3), partial(warmup_constant, warmup_steps=10),
                 data_shape=(2,), rho=3.0, p_std=0.5, sampling={"steps": 5})
    for sampler in ("heun", "euler"):
        grid = module.grid(sampler, module.sample_steps)
        torch.testing.assert_close(grid, karras_grid(5, 0.002, 80.0, 3.0))
        assert not torch.allclose(grid, karras_grid(5, 0.002, 80.0, 7.0))
    optim = module.configure_optimizers()
    assert isinstance(optim, dict) and optim["lr_scheduler"]["scheduler"] is not None
    for bad in ({"p_std": 0.0}, {"sigma_data": -1.0}):
        with pytest.raises(ValueError, match="sigma_data and model.p_std must be positive"):
            EDM(MLP((2,), hidden=8, depth=1, emb_dim=8), None, data_shape=(2,), **bad)
