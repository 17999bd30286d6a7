"""Score-SDE samplers with the exact score of a Gaussian mixture must reproduce the mixture; the ODE
log-likelihood with an exact score must match the true log-density; the ScoreSDE module wires them up.

The mixture perturbed by q(x_t | x_0) = N(m x_0, s^2 I) is again a mixture, so its score is exact at
every t: errors come only from the sampler, and tolerances are standard errors of the sample size.
"""

import math
from functools import partial

import pytest
import torch

from conftest import assert_loss_optimum_at_zero
from lightning_modules.analytic import GaussianMixture
from lightning_modules.nets import MLP
from lightning_modules.score_sde import ScoreSDE
from lightning_modules.sde import make_sde
from lightning_modules.sde_samplers import (
    bits_per_dim,
    dequantize,
    euler_maruyama,
    ode_log_likelihood,
    predictor_corrector,
    probability_flow_ode,
    probability_flow_ode_adaptive,
)
from test_ddpm_samplers import MIXTURE, N, check_matches_mixture

SAMPLE_EPS = {"ve": 1e-5, "vp": 1e-3, "subvp": 1e-3}


def analytic_score(mixture: GaussianMixture, sde):
    def score_fn(x, t):
        mean_scale, std = sde.marginal(t.double())
        return mixture.score(x, mean_scale, std)

    return score_fn


def run_sampler(name: str, sde_name: str, mixture: GaussianMixture = MIXTURE, seed: int = 0):
    sde = make_sde(sde_name)
    g = torch.Generator().manual_seed(seed)
    x_T = sde.prior_sample((N, 2), g)
    score_fn, eps = analytic_score(mixture, sde), SAMPLE_EPS[sde_name]
    if name == "euler_maruyama":
        return euler_maruyama(score_fn, sde, x_T, 1000, eps=eps, generator=g)
    if name == "pc":
        return predictor_corrector(score_fn, sde, x_T, 1000, snr=0.16, eps=eps, generator=g)
    if name == "pc_em":
        return predictor_corrector(score_fn, sde, x_T, 500, predictor="euler_maruyama", snr=0.16, n_corrector_steps=2, eps=eps, generator=g)
    if name == "ode_heun":
        return probability_flow_ode(score_fn, sde, x_T, 200, "heun", eps=eps)
    if name == "ode_adaptive":
        return probability_flow_ode_adaptive(score_fn, sde, x_T, 1e-5, 1e-5, eps=eps)[0]
    raise ValueError(name)


@pytest.mark.parametrize("sde_name", ["ve", "vp", "subvp"])
@pytest.mark.parametrize("sampler", ["euler_maruyama", "pc", "pc_em", "ode_heun", "ode_adaptive"])
def test_sampler_with_the_exact_score_reproduces_the_mixture(sampler, sde_name):
    check_matches_mixture(run_sampler(sampler, sde_name), MIXTURE)


@pytest.mark.parametrize("sampler", ["pc", "ode_adaptive"])
def test_sampler_with_a_wrong_score_fails_the_check(sampler):
    """Guard against a check that cannot fail: the score of a mixture with other weights must be rejected."""
    wrong = GaussianMixture(MIXTURE.means, MIXTURE.stds, weights=[0.45, 0.45, 0.1])
    x = run_sampler(sampler, "vp", mixture=wrong, seed=1)
    with pytest.raises(AssertionError):
        check_matches_mixture(x, MIXTURE)


def test_euler_ode_is_deterministic_and_heun_beats_euler_at_equal_steps():
    sde = make_sde("vp")
    score_fn = analytic_score(MIXTURE, sde)
    x_T = sde.prior_sample((500, 2), torch.Generator().manual_seed(2))
    reference = probability_flow_ode(score_fn, sde, x_T, 1000, "heun", eps=1e-3, denoise=False)
    euler = probability_flow_ode(score_fn, sde, x_T, 20, "euler", eps=1e-3, denoise=False)
    heun = probability_flow_ode(score_fn, sde, x_T, 20, "heun", eps=1e-3, denoise=False)
    torch.testing.assert_close(euler, probability_flow_ode(score_fn, sde, x_T, 20, "euler", eps=1e-3, denoise=False))
    assert (heun - reference).abs().mean() < 0.5 * (euler - reference).abs().mean()


def test_adaptive_ode_reports_its_nfe_and_tighter_tolerance_costs_more():
    sde = make_sde("ve")
    score_fn = analytic_score(MIXTURE, sde)
    x_T = sde.prior_sample((200, 2), torch.Generator().manual_seed(3))
    calls = []
    counted = lambda x, t: calls.append(1) or score_fn(x, t)  # noqa: E731
    _, nfe_loose = probability_flow_ode_adaptive(counted, sde, x_T, 1e-3, 1e-3, eps=1e-5)
    assert nfe_loose == len(calls)  # denoise adds its one evaluation to the solver's
    _, nfe_tight = probability_flow_ode_adaptive(score_fn, sde, x_T, 1e-6, 1e-6, eps=1e-5)
    assert nfe_tight > nfe_loose > 10


# --- likelihood --------------------------------------------------------------------------------------

GAUSSIAN = GaussianMixture(means=[[0.5, -1.0, 0.3]], stds=[0.7])


def true_logp(mixture, sde, x, eps):
    mean_scale, std = sde.marginal(torch.tensor([eps], dtype=torch.float64))
    return mixture.log_prob(x, mean_scale, std)


@pytest.mark.parametrize("sde_name", ["ve", "vp", "subvp"])
def test_ode_likelihood_of_gaussian_data_matches_the_true_log_density(sde_name):
    """For an isotropic Gaussian the ODE's Jacobian is a multiple of I, so Rademacher probes give the exact
    trace: only the ODE solver's error remains (rtol 1e-5)."""
    sde = make_sde(sde_name)
    x = GAUSSIAN.sample(200, torch.Generator().manual_seed(0))
    logp, nfe = ode_log_likelihood(analytic_score(GAUSSIAN, sde), sde, x, "rademacher", eps=1e-5, generator=torch.Generator().manual_seed(1))
    err = logp.double() - true_logp(GAUSSIAN, sde, x, 1e-5)
    assert err.abs().mean() < 0.02 and err.abs().max() < 0.15, (err.abs().mean(), err.abs().max())
    assert nfe > 10


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_ode_likelihood_is_unbiased_with_either_probe_on_a_mixture(probe):
    """With a non-diagonal Jacobian the Hutchinson estimate is noisy per sample but unbiased: the mean error
    over samples is within 5 standard errors (plus the solver's tolerance)."""
    sde = make_sde("vp")
    x = MIXTURE.sample(300, torch.Generator().manual_seed(0))
    logp, _ = ode_log_likelihood(analytic_score(MIXTURE, sde), sde, x, probe, eps=1e-5, generator=torch.Generator().manual_seed(1))
    err = logp.double() - true_logp(MIXTURE, sde, x, 1e-5)
    assert abs(err.mean().item()) < 5 * err.std().item() / math.sqrt(len(x)) + 0.02
    # and the check can fail: the log-density of a different mixture is far off
    wrong = GaussianMixture(MIXTURE.means, MIXTURE.stds, weights=[0.45, 0.45, 0.1])
    err_wrong = logp.double() - true_logp(wrong, sde, x, 1e-5)
    assert abs(err_wrong.mean().item()) > 5 * err_wrong.std().item() / math.sqrt(len(x)) + 0.02


class AnalyticModule:
    """What bits_per_dim needs of a module: .sde, .eps and .score(x, t, cond)."""

    def __init__(self, mixture, sde_name, eps=1e-5):
        self.sde, self.eps = make_sde(sde_name), eps
        self._score = analytic_score(mixture, self.sde)

    def score(self, x, t, cond=None):
        return self._score(x, t)


def test_bits_per_dim_with_dequantization_matches_the_discrete_distribution():
    """Data quantized to 256 levels in [-1, 1]; the model is a Gaussian, so the probability of each discrete
    value is a product of normal-CDF differences over its bin. The dequantized ODE bits/dim (an upper bound)
    must be within 0.01 bits of -log2 P(k) / D, on average over the batch."""
    levels, std = 256, 0.5
    gaussian = GaussianMixture(means=[[0.1, -0.2, 0.3]], stds=[std])
    g = torch.Generator().manual_seed(4)
    k = torch.round((gaussian.sample(200, g).clamp(-0.999, 0.999) + 1) / 2 * (levels - 1))
    x = 2 * k / (levels - 1) - 1  # as a datamodule hands them over
    lo, hi = 2 * k / levels - 1, 2 * (k + 1) / levels - 1  # the bin dequantization spreads k over
    normal = torch.distributions.Normal(gaussian.means[0], std)
    log_pk = torch.log(normal.cdf(hi.double()) - normal.cdf(lo.double())).sum(1)
    exact_bpd = -log_pk / (3 * math.log(2))
    bpd, _ = bits_per_dim(AnalyticModule(gaussian, "vp"), x, num_levels=levels, generator=torch.Generator().manual_seed(5))
    assert abs(bpd.double().mean().item() - exact_bpd.mean().item()) < 0.01, (bpd.mean(), exact_bpd.mean())
    assert dequantize(x, levels, g).sub(lo).min() >= 0 and hi.sub(dequantize(x, levels, g)).min() > 0


# --- the module ----------------------------------------------------------------------------------------


def toy_module(sde="vp", **kw):
    net = MLP((2,), hidden=32, depth=2, emb_dim=16)
    kw = {"sample_steps": 4, **kw}
    return ScoreSDE(net, partial(torch.optim.Adam, lr=1e-3), data_shape=(2,), sde=sde, **kw)


@pytest.mark.parametrize("sde", ["ve", "vp", "subvp"])
@pytest.mark.parametrize("likelihood_weighting", [False, True])
def test_module_loss_is_finite_and_trains_on_one_batch(sde, likelihood_weighting):
    torch.manual_seed(0)
    module = toy_module(sde, likelihood_weighting=likelihood_weighting)
    batch = {"x": MIXTURE.sample(256, torch.Generator().manual_seed(0))}
    opt = module.optimizer_factory(params=module.parameters())
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731 - the same t and noise every step: one-batch overfit
    first = module.loss(batch, g()).item()
    for _ in range(150):
        opt.zero_grad()
        module.loss(batch, g()).backward()
        opt.step()
    assert math.isfinite(first) and module.loss(batch, g()).item() < 0.7 * first


def test_module_score_parametrization_and_noise_level():
    ve, vp = toy_module("ve"), toy_module("vp")
    t = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(ve.noise_level(t), torch.log(0.01 * 5000.0**t))
    torch.testing.assert_close(vp.noise_level(t), 999 * t)
    x = torch.randn(3, 2)
    with torch.no_grad():
        vp.net.fc_out.bias.fill_(1.0)
    _, std = vp.sde.marginal(t)
    torch.testing.assert_close(vp.score(x, t), -torch.ones(3, 2) / std[:, None])


@pytest.mark.parametrize("sampler,nfe", [("pc", 9), ("euler_maruyama", 5), ("ode", 9)])
def test_module_samples_with_each_sampler_and_counts_nfe(sampler, nfe):
    module = toy_module("ve")
    calls = []
    forward = module.net.forward
    module.net.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    x = module.sample(7, sampler=sampler, generator=torch.Generator().manual_seed(0))
    assert x.shape == (7, 2) and torch.isfinite(x).all()
    assert module.nfe(sampler) == nfe == len(calls)


def test_module_adaptive_ode_records_its_nfe():
    module = toy_module("vp")
    assert module.nfe("ode_adaptive") == 0  # nothing solved yet
    module.sample(5, sampler="ode_adaptive", generator=torch.Generator().manual_seed(0))
    assert module.nfe("ode_adaptive") > 1


def test_module_bits_per_dim_of_a_zero_score_is_the_prior():
    """A freshly built net outputs 0, so for VE the ODE velocity is 0 and x stays put: the likelihood is the
    N(0, sigma_max^2) prior's, plus the dequantization offset log2(256 / 2) = 7."""
    module = toy_module("ve")
    x = torch.tensor([[0.5, -0.25], [1.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    bpd, _ = module.bits_per_dim(x, num_levels=None, generator=g)
    expected = -torch.distributions.Normal(0.0, 50.0).log_prob(x).sum(1) / (2 * math.log(2))
    torch.testing.assert_close(bpd.float(), expected, atol=1e-4, rtol=0)
    bpd_q, _ = module.bits_per_dim(x, num_levels=256, generator=g)
    assert (bpd_q - bpd).sub(7).abs().max() < 1e-3  # the prior is flat at this scale: only the offset changes


def test_reverse_diffusion_with_steps_too_coarse_for_ddpm_chain_fails_clearly():
    sde = make_sde("vp")
    score_fn = analytic_score(MIXTURE, sde)
    with pytest.raises(ValueError, match="sample_steps"):
        predictor_corrector(score_fn, sde, torch.randn(4, 2), steps=10, eps=1e-3)
    assert torch.isfinite(predictor_corrector(score_fn, sde, torch.randn(4, 2), steps=25, eps=1e-3)).all()


def test_module_rejects_unknown_names():
    with pytest.raises(ValueError, match="model.sampler"):
        toy_module(sampler="ddim")
    with pytest.raises(ValueError, match="model.sde"):
        toy_module(sde="vpp")
    with pytest.raises(ValueError, match="model.predictor"):
        toy_module(predictor="ancestral").sample(2, sampler="pc")


# --- the loss's optimum and its weighting ----------------------------------------------------------------


class ExactScoreNet(torch.nn.Module):
    """The net that makes ScoreSDE.score the mixture's exact score (score = -net / std), plus `a` times its input:
    a one-parameter family through the optimum. It reads t back from the noise level the module feeds."""

    def __init__(self, mixture: GaussianMixture, sde, sde_name: str):
        super().__init__()
        self.mixture, self.sde, self.sde_name = mixture, sde, sde_name
        self.a = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, noise_level, cond=None):
        t = noise_level.double() / 999.0 if self.sde_name != "ve" else (noise_level.double() - math.log(self.sde.sigma_min)) / self.sde.log_ratio
        mean, std = self.sde.marginal(t)
        exact = -std[:, None] * self.mixture.score(x.double(), mean, std)
        return exact.to(x.dtype) + self.a * x


@pytest.mark.parametrize("likelihood_weighting", [False, True])
@pytest.mark.parametrize("sde", ["ve", "vp", "subvp"])
def test_loss_gradient_vanishes_at_the_exact_score(sde, likelihood_weighting):
    """Denoising score matching is minimised by the true score at every t, so along s + a x / std the expected
    gradient at a = 0 is 0, and at a = 0.5 it is positive. A sign error in std * s + z, a missing std or a score
    read with the wrong sign all move the minimum off the exact score. Each estimate is the mean of 16 batch
    gradients, judged against 5 of its standard errors."""
    module = toy_module(sde, likelihood_weighting=likelihood_weighting)
    net = ExactScoreNet(MIXTURE, module.sde, sde)
    module.net = net

    assert_loss_optimum_at_zero(module.loss, net.a, MIXTURE.sample, 0.5, seed=300)


class ZeroNet(torch.nn.Module):
    def forward(self, x, noise_level, cond=None):
        return torch.zeros_like(x)


@pytest.mark.parametrize("likelihood_weighting", [False, True])
@pytest.mark.parametrize("sde", ["ve", "vp", "subvp"])
def test_loss_of_a_zero_score_is_the_weighted_noise_energy_over_t_in_eps_to_1(sde, likelihood_weighting):
    """With s = 0 the per-sample loss is 1/2 ||z||^2 (lambda = std^2) or 1/2 g(t)^2 ||z||^2 / std^2
    (lambda = g^2, Song et al. 2021b Thm 1), per dimension, at t = eps + (1 - eps) u: recomputed here from the
    same draws (u first, then z), so a wrong weighting, a wrong t range or a wrong normalisation fails."""
    module = toy_module(sde, likelihood_weighting=likelihood_weighting, eps=0.05)
    module.net = ZeroNet()
    x0 = MIXTURE.sample(512, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    u = torch.rand(512, generator=g)
    z = torch.randn(x0.shape, generator=g)
    t = 0.05 + 0.95 * u
    _, std = module.sde.marginal(t)
    energy = 0.5 * (z**2).sum(1)
    weight = module.sde.diffusion(t) ** 2 / std**2 if likelihood_weighting else torch.ones_like(t)
    expected = (weight * energy).mean() / 2
    torch.testing.assert_close(module.loss({"x": x0}, torch.Generator().manual_seed(2)), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("sde", ["ve", "vp", "subvp"])
def test_module_sample_with_the_exact_score_reproduces_the_mixture(sde):
    """The module's own wiring, which the sampler tests (given x_T) cannot see: the prior x_T = prior_std z
    (50 z for VE; N(0, 1) there would put every sample near the origin), the score read from the net, the
    sample_eps and the denoising step. Probability-flow ODE, 200 Heun steps."""
    module = toy_module(sde, sampler="ode", sample_steps=200, sample_eps=SAMPLE_EPS[sde])
    module.net = ExactScoreNet(MIXTURE, module.sde, sde)
    x = module.sample(N, generator=torch.Generator().manual_seed(11))
    check_matches_mixture(x, MIXTURE)


def test_module_bits_per_dim_of_a_conditional_model_is_its_true_conditional_density():
    """A conditional VP module with the exact conditional score (modes shifted by cond): the ODE likelihood at
    the module's own tolerances gives -log p(x | c) / (D ln 2), within 4 standard errors of the Hutchinson noise.
    Dropping cond anywhere on the way (the score, the ODE, the wrapper) scores the points under the wrong modes."""
    from test_teachers import CondScoreNet, mixture_for

    module = ScoreSDE(CondScoreNet(make_sde("vp")), partial(torch.optim.Adam, lr=1e-3), data_shape=(2,), cond_dim=2, sde="vp")
    module.net = CondScoreNet(module.sde)
    g = torch.Generator().manual_seed(3)
    cond = torch.randn(64, 2, generator=g)
    x = torch.cat([m.sample(1, g) for m in mixture_for(cond)])
    bpd, _ = module.bits_per_dim(x, cond=cond, num_levels=None, generator=torch.Generator().manual_seed(4))
    true = torch.cat([-m.log_prob(x[i : i + 1]) for i, m in enumerate(mixture_for(cond))]) / (2 * math.log(2))
    err = (bpd.double() - true)
    assert abs(err.mean().item()) < 4 * err.std().item() / math.sqrt(len(err)) + 1e-3, (err.mean(), err.std())
    wrong, _ = module.bits_per_dim(x, cond=cond + 2.0, num_levels=None, generator=torch.Generator().manual_seed(4))
    assert (wrong - bpd).mean() > 1.0  # the cond is what the likelihood is of


def test_bits_per_dim_draws_only_from_its_generator():
    module = toy_module("ve")
    x = torch.tensor([[0.5, -0.25], [1.0, -1.0]])
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a, _ = module.bits_per_dim(x, num_levels=256, generator=torch.Generator().manual_seed(1))
    b, _ = module.bits_per_dim(x, num_levels=256, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), state)
