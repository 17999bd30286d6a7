"""Score-SDE samplers with the exact score of a Gaussian mixture must reproduce the mixture; the ODE
log-likelihood with an exact score must match the true log-density; the ScoreSDE module wires them up.

The mixture perturbed by q(x_t | x_0) = N(m x_0, s^2 I) is again a mixture, so its score is exact at
every t: errors come only from the sampler, and tolerances are standard errors of the sample size.

The samplers (the `samplers` registry) run on a VE-form denoiser: x_VE = x / m = x0 + sigma n with
sigma = s / m, and D(x_VE; sigma) = x_VE + sigma^2 m score(m x_VE, t(sigma)); the SDE's native grid is
sigma(t_k) on t = 1 -> eps evenly spaced, and the denoising step at eps is a last step to sigma = 0.
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
from samplers import SAMPLERS, Counted, grids
from samplers.likelihood import dequantize, log_likelihood
from test_ddpm_samplers import MIXTURE, N, check_matches_mixture

SAMPLE_EPS = {"ve": 1e-5, "vp": 1e-3, "subvp": 1e-3}


def analytic_score(mixture: GaussianMixture, sde):
    def score_fn(x, t):
        mean_scale, std = sde.marginal(t.double())
        return mixture.score(x, mean_scale, std)

    return score_fn


def _t(sde, value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float64)


def mean_scale(sde, t: float) -> float:
    return sde.marginal(_t(sde, t))[0].item()


def ve_denoiser(score_fn, sde):
    """The VE-form denoiser of a score in the SDE's own coordinates: at sigma, t = t(sigma) and (m, s) the marginal
    there (s / m = sigma), x_native = m x_VE, score_VE(x_VE) = m score(m x_VE, t), D = x_VE + sigma^2 score_VE.
    In float64 (at VP's sigma_max ~ 152, D is x minus almost all of itself)."""

    def denoiser(x, sigma):
        sigma = sigma.double()
        t = sde.t_of_ve_sigma(sigma)
        m = sde.marginal(t)[0][:, None]
        return (x.double() + sigma[:, None] ** 2 * m * score_fn(m * x.double(), t)).to(x.dtype)

    return denoiser


def sde_grid(sde, steps: int, eps: float, denoise: bool = True) -> torch.Tensor:
    """sigma(t_k) on steps + 1 evenly spaced times 1 -> eps, then (denoise) a last step to 0: Tweedie at eps."""
    sigmas = grids.time_uniform(sde.ve_sigma, steps, sde.T, eps)
    return grids.append_zero(sigmas) if denoise else sigmas


def to_ve(sde, x_T: torch.Tensor) -> torch.Tensor:
    """The prior draw x_T (the SDE's own coordinates at t = T) in VE form."""
    return x_T / mean_scale(sde, sde.T)


def run_sampler(name: str, sde_name: str, mixture: GaussianMixture = MIXTURE, seed: int = 0):
    sde = make_sde(sde_name)
    g = torch.Generator().manual_seed(seed)
    x = to_ve(sde, sde.prior_sample((N, 2), g))
    denoiser, eps = ve_denoiser(analytic_score(mixture, sde), sde), SAMPLE_EPS[sde_name]
    if name == "euler_maruyama":
        return SAMPLERS["euler_maruyama"].fn(denoiser, x, sde_grid(sde, 1000, eps), generator=g)
    if name == "pc":
        return SAMPLERS["pc"].fn(denoiser, x, sde_grid(sde, 1000, eps), generator=g, snr=0.16, n_corrector_steps=1)
    if name == "pc_em":
        # the old euler_maruyama predictor: in VE form both predictors are one step; fewer levels, two corrector steps
        return SAMPLERS["pc"].fn(denoiser, x, sde_grid(sde, 500, eps), generator=g, snr=0.16, n_corrector_steps=2)
    if name == "ode_heun":
        return SAMPLERS["heun"].fn(denoiser, x, sde_grid(sde, 200, eps))
    if name == "ode_adaptive":
        return SAMPLERS["ode_adaptive"].fn(denoiser, x, sde_grid(sde, 1, eps), rtol=1e-5, atol=1e-5)
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
    """On the VP SDE's native grid sigma(t_k), without the denoising step (the state at sigma(eps), VE form)."""
    sde = make_sde("vp")
    denoiser = ve_denoiser(analytic_score(MIXTURE, sde), sde)
    x_T = to_ve(sde, sde.prior_sample((500, 2), torch.Generator().manual_seed(2)))
    euler_fn, heun_fn = SAMPLERS["euler"].fn, SAMPLERS["heun"].fn
    grid = lambda steps: sde_grid(sde, steps, 1e-3, denoise=False)  # noqa: E731
    reference = heun_fn(denoiser, x_T, grid(1000))
    euler = euler_fn(denoiser, x_T, grid(20))
    heun = heun_fn(denoiser, x_T, grid(20))
    torch.testing.assert_close(euler, euler_fn(denoiser, x_T, grid(20)))
    assert (heun - reference).abs().mean() < 0.5 * (euler - reference).abs().mean()


def test_adaptive_ode_reports_its_nfe_and_tighter_tolerance_costs_more():
    """The NFE a sampler spent is what samplers.Counted (the module's return_nfe) reports: every solver evaluation
    (each one seen by the callback) and the denoising step's one."""
    sde = make_sde("ve")
    denoiser = ve_denoiser(analytic_score(MIXTURE, sde), sde)
    x_T = to_ve(sde, sde.prior_sample((200, 2), torch.Generator().manual_seed(3)))
    calls, seen = [], []
    loose = Counted(lambda x, s: calls.append(1) or denoiser(x, s))
    SAMPLERS["ode_adaptive"].fn(loose, x_T, sde_grid(sde, 1, 1e-5), callback=lambda i, s, x: seen.append(i), rtol=1e-3, atol=1e-3)
    assert loose.calls == len(calls) == len(seen) + 1  # denoise adds its one evaluation to the solver's
    assert seen == list(range(len(seen)))
    tight = Counted(denoiser)
    SAMPLERS["ode_adaptive"].fn(tight, x_T, sde_grid(sde, 1, 1e-5), rtol=1e-6, atol=1e-6)
    assert tight.calls > loose.calls > 10
    assert SAMPLERS["ode_adaptive"].nfe(sde_grid(sde, 1, 1e-5).tolist(), {}) is None  # known only after the solve


# --- likelihood --------------------------------------------------------------------------------------

GAUSSIAN = GaussianMixture(means=[[0.5, -1.0, 0.3]], stds=[0.7])


def true_logp(mixture, sde, x, eps):
    mean_scale, std = sde.marginal(torch.tensor([eps], dtype=torch.float64))
    return mixture.log_prob(x, mean_scale, std)


def ode_log_likelihood(score_fn, sde, x, probe, eps, generator):
    """log p_eps(x) in the SDE's own coordinates through samplers.likelihood, which works in VE form: the data at
    t = eps are x_VE = x / m(eps) at sigma(eps), the prior N(0, prior_std^2 I) at T is N(0, (prior_std / m(T))^2 I)
    at sigma(T), and the change of variables x = m x_VE gives log p(x) = log p_VE(x / m) - D log m."""
    m_lo, m_hi = mean_scale(sde, eps), mean_scale(sde, sde.T)
    lo, hi = sde.ve_sigma(_t(sde, eps)).item(), sde.ve_sigma(_t(sde, sde.T)).item()
    logp, nfe = log_likelihood(ve_denoiser(score_fn, sde), x / m_lo, lo, hi, sde.prior_std() / m_hi, probe, generator=generator)
    return logp - x[0].numel() * math.log(m_lo), nfe


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


# samplers.likelihood integrates div(x - D) = d - tr(J_D) in u = log sigma with the identity's trace exact and only
# tr(J_D) estimated, so neither probe pays for the identity part (J_D vanishes above the data scale): 300 points each.
LIKELIHOOD_N = {"rademacher": 300, "gaussian": 300}


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_ode_likelihood_is_unbiased_with_either_probe_on_a_mixture(probe):
    """With a non-diagonal Jacobian the Hutchinson estimate is noisy per sample but unbiased: the mean error
    over samples is within 5 standard errors (plus the solver's tolerance)."""
    sde = make_sde("vp")
    x = MIXTURE.sample(LIKELIHOOD_N[probe], torch.Generator().manual_seed(0))
    logp, _ = ode_log_likelihood(analytic_score(MIXTURE, sde), sde, x, probe, eps=1e-5, generator=torch.Generator().manual_seed(1))
    err = logp.double() - true_logp(MIXTURE, sde, x, 1e-5)
    assert abs(err.mean().item()) < 5 * err.std().item() / math.sqrt(len(x)) + 0.02
    # and the check can fail: the log-density of a different mixture is far off
    wrong = GaussianMixture(MIXTURE.means, MIXTURE.stds, weights=[0.45, 0.45, 0.1])
    err_wrong = logp.double() - true_logp(wrong, sde, x, 1e-5)
    assert abs(err_wrong.mean().item()) > 5 * err_wrong.std().item() / math.sqrt(len(x)) + 0.02


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
    # DiffusionModule.bits_per_dim of a VP module with the exact score, from t = eps (model.eps) to T
    module = ScoreSDE(MLP((3,), hidden=8, depth=1, emb_dim=8), partial(torch.optim.Adam, lr=1e-3), data_shape=(3,), sde="vp", eps=1e-5)
    module.net = ExactScoreNet(gaussian, module.sde, "vp")
    bpd, _ = module.bits_per_dim(x, num_levels=levels, generator=torch.Generator().manual_seed(5))
    assert abs(bpd.double().mean().item() - exact_bpd.mean().item()) < 0.01, (bpd.mean(), exact_bpd.mean())
    assert dequantize(x, levels, g).sub(lo).min() >= 0 and hi.sub(dequantize(x, levels, g)).min() > 0


# --- the module ----------------------------------------------------------------------------------------


def toy_module(sde="vp", **kw):
    net = MLP((2,), hidden=32, depth=2, emb_dim=16)
    kw["sampling"] = {"steps": 4, **kw.get("sampling", {})}
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
    x, spent = module.sample(7, sampler=sampler, generator=torch.Generator().manual_seed(0), return_nfe=True)
    assert x.shape == (7, 2) and torch.isfinite(x).all()
    assert module.nfe(sampler) == nfe == len(calls) == spent


def test_module_adaptive_ode_returns_its_nfe():
    module = toy_module("vp")
    assert module.nfe("ode_adaptive") is None  # known only after the solve
    calls = []
    forward = module.net.forward
    module.net.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    x, nfe = module.sample(5, sampler="ode_adaptive", generator=torch.Generator().manual_seed(0), return_nfe=True)
    assert x.shape == (5, 2) and torch.isfinite(x).all()
    assert nfe == len(calls) > 1


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


def test_reverse_diffusion_predictor_in_ve_form_is_defined_on_grids_too_coarse_for_ddpm_chain():
    """The old reverse-diffusion predictor was VP's discrete chain (DDPM's, beta_i = beta(t) dt) and had to refuse
    beta_max dt >= 1 (VP with 10 steps). The VE-form predictor, x + (s^2 - s'^2) / s^2 (D - x) + sqrt(s^2 - s'^2) z,
    weighs D - x by a number in [0, 1) on any decreasing grid, so there is nothing to refuse: on the 10-step VP grid
    each step is that closed form (D = 0, a point mass at 0: x' = (s'^2 / s^2) x + sqrt(s^2 - s'^2) z, the draws
    replayed from the same seed), and the predictor-corrector sampler ends finite at 10 steps as at 25."""
    sde = make_sde("vp")
    grid = sde_grid(sde, 10, 1e-3, denoise=False).tolist()
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    zero = lambda y, sigma: torch.zeros_like(y)  # noqa: E731
    for s, s_next in zip(grid[:-1], grid[1:]):
        got = SAMPLERS["euler_maruyama"].fn(zero, x, [s, s_next], generator=torch.Generator().manual_seed(6))
        z = torch.randn(4, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
        torch.testing.assert_close(got, (s_next**2 / s**2) * x + math.sqrt(s**2 - s_next**2) * z)
    denoiser = ve_denoiser(analytic_score(MIXTURE, sde), sde)
    for steps in (10, 25):
        x_T = to_ve(sde, torch.randn(4, 2, generator=torch.Generator().manual_seed(steps)))
        out = SAMPLERS["pc"].fn(denoiser, x_T, sde_grid(sde, steps, 1e-3), generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(out).all()
    module = toy_module("vp", sampling={"sampler": "pc", "steps": 10})
    module.net = ExactScoreNet(MIXTURE, module.sde, "vp")
    assert torch.isfinite(module.sample(4, generator=torch.Generator().manual_seed(1))).all()


def test_module_rejects_unknown_names():
    toy_module(sampling={"sampler": "ddim"})  # every registry sampler runs on a score SDE's VE-form denoiser
    with pytest.raises(ValueError, match="model.sampling.sampler"):
        toy_module(sampling={"sampler": "ddim_sample"})  # no sampler of that name
    with pytest.raises(ValueError, match="model.sampling.sampler"):
        toy_module(sampling={"sampler": "cm"})  # needs a consistency function
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
    module = toy_module(sde, sample_eps=SAMPLE_EPS[sde], sampling={"sampler": "ode", "steps": 200})
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
