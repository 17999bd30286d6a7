"""Exposure-bias options of DDPM (Epsilon Scaling, time-step shifting, trajectories) and its measurement.

Perfect denoisers come from analytic.GaussianMixture, so a measured gap is either zero in expectation
(and checked within standard errors) or follows a stated closed form.
"""

import math
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

import samplers
from lightning_modules import exposure_fixes
from lightning_modules.analytic import ExactEpsNet, GaussianMixture
from lightning_modules.ddpm import DDPM
from lightning_modules.exposure_bias import PER_STEP, measure_exposure_bias
from lightning_modules.exposure_fixes import TimeShift, scale_eps, shift_levels
from lightning_modules.nets import MLP
from lightning_modules.schedules import DiscreteSchedule, ddim_step, make_betas
from samplers import grids, stochastic
from samplers.core import batch_sigma, bcast

T = 100


def ExactEps(mixture: GaussianMixture, num_timesteps: int = T) -> ExactEpsNet:
    return ExactEpsNet(mixture, DiscreteSchedule(make_betas("linear", num_timesteps)).alphas_cumprod)


def ddpm(net=None, dim=2, **kwargs) -> DDPM:
    torch.manual_seed(0)
    if net is None:
        net = MLP((dim,), hidden=32, depth=2, emb_dim=16)
        nn.init.normal_(net.fc_out.weight, std=0.5)  # the MLP starts as the zero function, under which scaling is a no-op
    block = {"steps": 10, **kwargs.pop("sampling", {})}
    return DDPM(net, partial(torch.optim.Adam, lr=1e-3), data_shape=(dim,), num_timesteps=T, sampling=block, **kwargs)


def plain_sample(model: DDPM, sampler: str, x_T: torch.Tensor, generator: torch.Generator, steps: int | None = None, **options):
    """The registry sampler itself on the model's VE-form denoiser (no exposure-bias wrapper, no reread hook), on the
    levels DDPM.sample visits, from x_T (VP coordinates) read in the VE form: the plain sampler the options modify."""
    sigmas = model.grid(sampler, steps or model.sample_steps)
    x = model.to_ve(x_T, float(sigmas[0]))
    return samplers.get(sampler).fn(lambda v, sigma: model.denoise(v, sigma), x, sigmas, generator=generator, **options)


def eps_of(denoiser, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The eps a VE-form denoiser implies: x = x0 + sigma eps, so eps = (x - D(x; sigma)) / sigma."""
    return (x - denoiser(x, sigma)) / bcast(sigma, x)


# --- Epsilon Scaling ------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [{}, {"eps_scale": 1.0}, {"eps_scale_schedule": "linear", "eps_scale_slope": 0.0}])
def test_eps_scale_one_is_bitwise_the_unscaled_sampler(settings):
    model = ddpm(sampling={"options": settings})
    x_T = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    for sampler, options in [("ancestral", {"variance": model.sampling_options["variance"]}), ("ddim", {"eta": 1.0})]:
        want = plain_sample(model, sampler, x_T, torch.Generator().manual_seed(1), **options)
        got = model.sample(32, sampler=sampler, x_T=x_T, generator=torch.Generator().manual_seed(1), eps_scale=1.0,
                           **({"eta": 1.0} if sampler == "ddim" else {}))
        assert torch.equal(got, want), sampler


def test_eps_scale_divides_eps_by_its_schedule():
    """scale_eps wraps a VE-form denoiser, D' = x - (x - D) / lambda: the eps it implies is eps / lambda_t. The
    linear schedule lambda_t = eps_scale + slope * t is DDPM's (eps_lambda), t read from sigma by level_of."""
    unit_eps = lambda x, sigma: x - bcast(sigma, x)  # noqa: E731  (the denoiser whose eps is 1 everywhere)
    model = ddpm(sampling={"options": {"eps_scale": 1.01, "eps_scale_schedule": "linear", "eps_scale_slope": 0.002}})
    t = torch.tensor([0, 10, 50])
    x, sigma = torch.zeros(3, 2, dtype=torch.float64), model.level_sigmas[t]
    torch.testing.assert_close(eps_of(scale_eps(unit_eps, 1.25), x, sigma), torch.full((3, 2), 0.8, dtype=torch.float64))
    lam = 1.01 + 0.002 * t.double()
    torch.testing.assert_close(eps_of(scale_eps(unit_eps, model.eps_lambda(1.01)), x, sigma), (1 / lam)[:, None].expand(3, 2))
    with pytest.raises(ValueError, match="eps_scale_schedule"):
        ddpm(sampling={"options": {"eps_scale_schedule": "cosine"}})
    with pytest.raises(ValueError, match="eps_scale"):
        ddpm(sampling={"options": {"eps_scale": 0.0}})
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    a = ddpm().sample(8, sampler="ddim", x_T=x_T)
    b = ddpm().sample(8, sampler="ddim", x_T=x_T, eps_scale=1.05)
    assert (a - b).abs().max() > 1e-4


# --- time-step shifting ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_time_shift_window_zero_is_bitwise_the_plain_sampler(sampler):
    model = ddpm(sampling={"options": {"time_shift_window": 0, "time_shift_cutoff": 5}})
    x_T = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(2)
    options = {"variance": model.sampling_options["variance"]} if sampler == "ancestral" else {"eta": 0.5}
    want = plain_sample(model, sampler, x_T, g, **options)
    eta = {} if sampler == "ancestral" else {"eta": 0.5}  # ancestral is eta = 1 by definition and refuses eta=
    got = model.sample(32, sampler=sampler, x_T=x_T, generator=torch.Generator().manual_seed(2), time_shift_window=0, **eta)
    assert torch.equal(got, want)


@pytest.mark.parametrize("true_level", [150, 400, 700])
def test_shift_levels_finds_the_level_whose_forward_variance_fits(true_level):
    """x = sqrt(abar) x0 + sqrt(1 - abar) z with many elements: the element variance names its level, as far as
    the variance of d elements can tell levels apart (at high noise abar barely moves, and neither can it)."""
    schedule = DiscreteSchedule(make_betas("linear", 1000))
    g = torch.Generator().manual_seed(true_level)
    d, s2 = 100_000, 0.3
    abar = schedule.alphas_cumprod.double()
    fwd_var = abar * s2 + 1 - abar
    x0 = math.sqrt(s2) * torch.randn(4, d, generator=g)
    x = abar[true_level].sqrt().float() * x0 + (1 - abar[true_level]).sqrt().float() * torch.randn(4, d, generator=g)
    got = shift_levels(x, true_level + 20, schedule, window=40, lowest=0, data_var=torch.tensor(s2))
    se = fwd_var[true_level] * math.sqrt(2 / d)
    assert ((fwd_var[got] - fwd_var[true_level]).abs() < 5 * se).all(), got
    if true_level < 500:  # the authors' rule (data variance 0) reads the data's share as noise: a higher level
        authors = shift_levels(x, true_level + 20, schedule, window=40, lowest=0, data_var=torch.tensor(0.0))
        assert (authors > got).all()
        # the window and the floor bound the choice: the level nearest the truth that they allow
        clipped = shift_levels(x, true_level + 30, schedule, window=5, lowest=true_level + 28, data_var=torch.tensor(s2))
        assert (clipped == true_level + 28).all()


@pytest.mark.parametrize("sampler,window", [("ddim", 4), ("ddim", 15), ("ancestral", 3)])  # DDIM's stride here is 11
def test_shifted_levels_stay_in_the_window_and_above_the_next_level(sampler, window):
    model = ddpm(dim=64, sampling={"options": {"time_shift_window": window}})
    x_T = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    levels, sigmas = [], []

    def watch(i, sigma, x):  # the callback sees each row's (shifted) VE level; level_of names the trained step
        sigmas.append(sigma)
        levels.append(model.level_of(sigma))

    x = model.sample(16, sampler=sampler, x_T=x_T, generator=torch.Generator().manual_seed(1), callback=watch)
    assert torch.isfinite(x).all()
    # a shifted level is a trained one: its sigma is the table's (to float32) and level_of reads back an integer
    assert all(torch.equal(s, model.level_sigmas[t.long()].to(s.dtype)) for s, t in zip(sigmas, levels))
    levels = [t.long() for t in levels]
    nominal = grids.discrete_levels(model.level_sigmas, 10).tolist() if sampler == "ddim" else list(range(T - 1, -1, -1))
    assert len(levels) == len(nominal) and (levels[0] == nominal[0]).all()
    for k, (t, i) in enumerate(zip(levels, nominal)):
        below = nominal[k + 1] if k + 1 < len(nominal) else -1
        assert ((t - i).abs() <= window).all() and (t > below).all() and (t < T).all()
    assert any((t != i).any() for t, i in zip(levels, nominal))  # it does shift


def test_a_step_from_a_shifted_level_is_q_posterior_for_one_step_and_exact_for_many(monkeypatch):
    """A shifted step (the old skip_posterior) is now the VE-form step from the row's own level s, which TimeShift hands
    the sampler through its reread hook (the VP state kept, its level changed), to the next nominal level p:
    mean x0 + (sigma_p / sigma_s)^2 (x - x0) and variance sigma_p^2 (sigma_s^2 - sigma_p^2) / sigma_s^2 ('posterior') or
    (sigma_s^2 - sigma_p^2)(1 + sigma_p^2) / (1 + sigma_s^2) ('beta'), i.e. q(x_p | x_s, x0) of Kingma et al. 2021,
    eq. 21 and its beta_{s|p} variant in VP coordinates (x_VP = x_VE / sqrt(1 + sigma^2)). With s = p + 1 they are
    q_posterior's mean and beta~ / beta; with a point mass (D = x0 exactly) many levels at once land on q(x_p | x0)."""
    schedule = DiscreteSchedule(make_betas("linear", T))
    table = schedule.sigmas()
    g = torch.Generator().manual_seed(0)
    n, mu = 20000, torch.tensor([0.5, -1.0])
    point_mass = lambda x, sigma: mu.to(x.dtype).expand_as(x)  # noqa: E731  (the exact denoiser of a point mass)
    s = torch.randint(11, 31, (n,), generator=g)
    x_s = schedule.q_sample(mu.expand(n, 2), s, torch.randn(n, 2, generator=g))

    def shifted_to(levels):
        """TimeShift at its second step (the first is never shifted), nominal level 30, next nominal `levels[2]`,
        with shift_levels replaced by the rows' own levels s."""
        def rows_own_level(x, nominal, schedule_, window, lowest, data_var):
            assert nominal == 30 and lowest == (0 if levels[2] < 0 else levels[2] + 1)
            return s

        monkeypatch.setattr(exposure_fixes, "shift_levels", rows_own_level)
        shift = TimeShift(schedule, levels, window=20, data_var=0.0)
        return lambda i, x, sigma: shift.reread(i + 1, x, sigma)

    # the state as the sampler holds it at the nominal level 30: x_s's VP values, in the VE form of level 30
    x_nominal = x_s * math.sqrt(1 + table[30] ** 2)
    x, sigma = shifted_to([99, 30, 10, -1])(0, x_nominal, batch_sigma(table[30], x_nominal))
    torch.testing.assert_close(sigma, table[s].float())
    torch.testing.assert_close(x, x_s * (1 + table[s] ** 2).sqrt().float()[:, None])  # the VP state kept, relabelled s
    # down to the data: x0 itself
    one = stochastic.ancestral(point_mass, x_nominal, grids.append_zero(table[[30]]), g, variance="posterior",
                               reread=shifted_to([99, 30, -1]))
    torch.testing.assert_close(one, mu.expand(n, 2))
    # one step, 40 -> 39: q_posterior's mean, and beta~_40 or beta_40 (VP) as the step's variance
    t = torch.full((n,), 40)
    x_t = schedule.q_sample(mu.expand(n, 2), t, torch.randn(n, 2, generator=g)).double()
    s40, s39 = table[40].item(), table[39].item()
    x_ve = x_t * math.sqrt(1 + s40**2)
    for variance, want_var in [("posterior", schedule.posterior_variance[40]), ("beta", schedule.betas[40])]:
        down, up = stochastic.beta_noise(s40, s39) if variance == "beta" else stochastic.ddim_noise(s40, s39, 1.0)
        mean_ve = mu.double() + (down / s40) * (x_ve - mu.double())
        # the sampler's step is that mean plus `up` times its fresh noise (drawn from the generator, replayed here)
        step = stochastic.ancestral(point_mass, x_ve, table[[40, 39]], torch.Generator().manual_seed(5), variance=variance)
        z = torch.randn(x_ve.shape, generator=torch.Generator().manual_seed(5), dtype=x_ve.dtype)
        torch.testing.assert_close(step, mean_ve + up * z)
        to_vp = 1 / math.sqrt(1 + s39**2)  # sqrt(abar_39)
        torch.testing.assert_close(mean_ve * to_vp, schedule.q_posterior(mu.expand(n, 2), x_t.float(), t)[0].double(),
                                   atol=1e-6, rtol=1e-5)
        assert up**2 * to_vp**2 == pytest.approx(want_var.double().item(), rel=1e-4)  # float32 buffers
    # from levels 11..30 down to 10 with a point mass: exactly q(x_10 | x0)
    x = stochastic.ancestral(point_mass, x_nominal, table[[30, 10]], g, variance="posterior", reread=shifted_to([99, 30, 10, -1]))
    abar = schedule.alphas_cumprod[10].double()
    x_vp = x.double() * abar.sqrt()  # 1 / sqrt(1 + sigma_10^2) = sqrt(abar_10)
    z = ((x_vp - abar.sqrt() * mu) / (1 - abar).sqrt()).flatten()
    assert abs(z.mean()) < 5 / math.sqrt(z.numel()) and abs(z.var() - 1) < 5 * math.sqrt(2 / z.numel())


@pytest.mark.parametrize("sampler,variance", [("ancestral", "beta"), ("ancestral", "posterior"), ("ddim", "beta")])
def test_shifting_to_the_nominal_level_reproduces_the_plain_sampler(monkeypatch, sampler, variance):
    """The shifted path (TimeShift's reread: the VE state back to VP, relabelled, back to VE at the new level), handed
    the nominal levels, is the plain sampler up to rounding."""
    model = ddpm(sampling={"options": {"variance": variance}})
    x_T = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    eta = {} if sampler == "ancestral" else {"eta": 0.7}  # ancestral is eta = 1 by definition and refuses eta=
    plain = model.sample(32, sampler=sampler, x_T=x_T, generator=torch.Generator().manual_seed(1), **eta)
    calls = []

    def nominal_levels(x, nominal, *args, **kwargs):
        calls.append(nominal)
        return torch.full((x.shape[0],), nominal)

    monkeypatch.setattr(exposure_fixes, "shift_levels", nominal_levels)
    shifted = model.sample(32, sampler=sampler, x_T=x_T, generator=torch.Generator().manual_seed(1), time_shift_window=3, **eta)
    # every step but the first (from x_T) and the one at level 0 (at the default cutoff 0) took the shifted path
    assert len(calls) == (T - 2 if sampler == "ancestral" else 8)
    torch.testing.assert_close(shifted, plain, atol=1e-4, rtol=1e-4)


def test_time_shift_needs_samples_with_several_elements():
    model = DDPM(MLP((1,), hidden=8, depth=1, emb_dim=8), partial(torch.optim.Adam), data_shape=(1,), num_timesteps=T, sampling={"options": {"time_shift_window": 2}})
    with pytest.raises(ValueError, match="2\\+ elements"):
        model.sample(4, sampler="ddim")


# --- trajectories -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_trajectory_and_callback_see_every_visited_state(sampler):
    """return_trajectory is gone: the callback is the trajectory. It sees, before each step, the (B,) VE levels and
    the VE-form state (x_VE = x_VP * sqrt(1 + sigma^2)), and each state is the one the sampler steps from: one step
    of the registry sampler from it, with the same noise stream, gives the next state (the last one the samples)."""
    model = ddpm()
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    seen = []
    kwargs = {} if sampler == "ancestral" else {"steps": 10, "eta": 1.0}
    x = model.sample(8, sampler=sampler, x_T=x_T, generator=torch.Generator().manual_seed(1),
                     callback=lambda i, sigma, x: seen.append((i, sigma, x)), **kwargs)
    plain = model.sample(8, sampler=sampler, x_T=x_T, generator=torch.Generator().manual_seed(1), **kwargs)
    assert torch.equal(x, plain)
    levels = torch.arange(T - 1, -1, -1) if sampler == "ancestral" else grids.discrete_levels(model.level_sigmas, 10)
    states, sigmas = torch.stack([xs for _, _, xs in seen]), torch.stack([sg for _, sg, _ in seen])
    assert states.shape == (len(levels), 8, 2) and torch.equal(sigmas, model.level_sigmas[levels].float()[:, None].expand(-1, 8))
    assert all(torch.equal(model.level_of(sg), levels[k].double().expand(8)) for k, (_, sg, _) in enumerate(seen))
    assert torch.equal(states[0], model.to_ve(x_T, float(model.level_sigmas[-1])))
    assert [i for i, _, _ in seen] == list(range(len(levels)))
    grid = model.grid(sampler, 10)
    options = {"variance": model.sampling_options["variance"]} if sampler == "ancestral" else {"eta": 1.0}
    step, g = samplers.get(sampler).fn, torch.Generator().manual_seed(1)
    nxt = [*states[1:], x]
    for k in range(len(levels)):
        one_step = step(lambda v, sg: model.denoise(v, sg), states[k], grid[k : k + 2], generator=g, **options)
        assert torch.equal(one_step, nxt[k]), k


# --- the measurement -------------------------------------------------------------------------------------

MU = [0.8, -0.4]
N = 4000


def point_mass_model(**kwargs):
    return ddpm(net=ExactEps(GaussianMixture(means=[MU], stds=[0.0])), **kwargs, sampling={"options": {"variance": "posterior"}})


def test_perfect_ancestral_sampler_on_a_point_mass_has_no_exposure_gap():
    """x0 is known exactly at every level, so each ancestral step is q(x_{t-1} | x_t, x0): x^_t ~ q(x_t | x0)."""
    model = point_mass_model()
    x0 = torch.tensor(MU).expand(N, 2)
    out = measure_exposure_bias(model, x0, "ancestral", generator=torch.Generator().manual_seed(0))
    assert all(out[k].shape == (T,) for k in PER_STEP) and out["nfe"] == T
    assert torch.equal(out["t"], torch.arange(T - 1, -1, -1, dtype=torch.float64))
    torch.testing.assert_close(out["q_var"], 1 - model.schedule.alphas_cumprod.flip(0).double())
    se = math.sqrt(2 / (N * 2))  # of sampler_var / q_var: a mean of N * D squared standard normals
    assert (out["ratio"] - 1).abs().max() < 5 * se
    assert out["delta_sum"] < (out["q_var"] * (5 * se) ** 2 / 4).sum()
    assert out["err_sampler"].max() < 1e-8 and out["err_forward"].max() < 1e-8
    # the check has power: Epsilon Scaling a perfect eps makes the sampler under-noise, and it shows
    scaled = measure_exposure_bias(model, x0, "ancestral", generator=torch.Generator().manual_seed(0), eps_scale=1.1)
    assert scaled["delta_sum"] > 50 * out["delta_sum"] and (scaled["ratio"] - 1).abs().max() > 10 * se


def test_deterministic_ddim_on_a_point_mass_keeps_the_forward_noise():
    model = point_mass_model()
    x0 = torch.tensor(MU).expand(N, 2)
    out = measure_exposure_bias(model, x0, "ddim", steps=10, generator=torch.Generator().manual_seed(1), eta=0.0)
    assert torch.equal(out["t"], grids.discrete_levels(model.level_sigmas, 10).double()) and out["nfe"] == 10
    # every state is q_sample(x0, t, z) with the one z of x_T: the ratio is mean(z^2) at every level
    torch.testing.assert_close(out["ratio"], out["ratio"][:1].expand(10), atol=1e-4, rtol=1e-4)
    assert abs(out["ratio"][0] - 1) < 5 * math.sqrt(2 / (N * 2))
    chunked = measure_exposure_bias(model, x0, "ddim", steps=10, generator=torch.Generator().manual_seed(1), eta=0.0, batch_size=1500)
    for key in ("t", "q_var", "sampler_var", "marginal_var_sampler"):
        torch.testing.assert_close(chunked[key], out[key], atol=1e-6, rtol=1e-5)


def test_perfect_ancestral_sampler_on_gaussian_data_keeps_the_forward_marginal():
    """Gaussian data N(mu, s^2 I): x^_t has q(x_t)'s variance at every level, while the gap conditioned on x0
    grows as the trajectory forgets x0 (documented in measure_exposure_bias)."""
    s = 0.5
    data = GaussianMixture(means=[MU], stds=[s])
    model = ddpm(net=ExactEps(data), sampling={"options": {"variance": "posterior"}})
    g = torch.Generator().manual_seed(3)
    x0 = data.sample(N, generator=g)
    out = measure_exposure_bias(model, x0, "ancestral", generator=g)
    abar = model.schedule.alphas_cumprod.flip(0).double()
    want = abar * s**2 + 1 - abar
    # two independent variance estimates from N rows (per element), averaged over D = 2 elements
    se = want * math.sqrt(2 * 2 / N / 2)
    assert ((out["marginal_var_sampler"] - out["marginal_var_forward"]).abs() < 5 * se).all()
    assert ((out["marginal_var_forward"] - want).abs() < 5 * want * math.sqrt(2 / N / 2)).all()
    assert out["ratio"][0] == pytest.approx(1, abs=0.05) and out["ratio"][-1] > 100
    assert (out["err_sampler"] > 0).all() and (out["err_forward"] > 0).all()


def test_plots_leave_the_global_matplotlib_backend_alone():
    """A notebook's inline backend must survive the callbacks' plots (matplotlib.use('Agg') used to replace it)."""
    import matplotlib

    from callbacks.exposure_bias import exposure_curve
    from difflab.pictures import scatter_over_reference

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        image = scatter_over_reference(torch.randn(50, 2), torch.randn(50, 2), title="t")
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
        t = torch.arange(5.0)
        result = {"t": t, "q_var": t, "sampler_var": t, "err_forward": t + 1, "err_sampler": t + 2, "delta_sum": 1.0}
        assert exposure_curve(result, "t").shape[2] == 3
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)


# --- targeted: what the mutation run showed no test could see -------------------------------------------


def test_ddim_step_with_eta_one_adds_the_ddpm_posterior_std():
    """Song et al. 2021 eq. 16: eta = 1 gives sigma_t^2 = (1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev), the
    posterior variance of one DDPM step; with x0 = eps = 0 and unit noise ddim_step returns exactly that sigma.
    The samplers' VE-form DDIM (samplers.stochastic.ddim_noise) adds sigma_up with sigma_up^2 abar_prev = the same
    (x_VP = sqrt(abar) x_VE), and eta = 0.5 half of it, as its sampler step shows with D = 0 and x = 0."""
    schedule = DiscreteSchedule(make_betas("linear", 100))
    abar = schedule.alphas_cumprod.double()
    table = schedule.sigmas()
    zero = lambda x, sigma: torch.zeros_like(x)  # noqa: E731
    for t in (1, 10, 50, 99):
        sigma = ddim_step(torch.zeros(1), torch.zeros(1), abar[t], abar[t - 1], 1.0, torch.ones(1))
        assert sigma.item() == pytest.approx(schedule.posterior_variance[t].double().sqrt().item(), rel=1e-4)  # float32 buffers
        half = ddim_step(torch.zeros(1), torch.zeros(1), abar[t], abar[t - 1], 0.5, torch.ones(1))
        assert half.item() == pytest.approx(0.5 * sigma.item(), rel=1e-6)
        _, up = stochastic.ddim_noise(table[t].item(), table[t - 1].item(), 1.0)
        _, up_half = stochastic.ddim_noise(table[t].item(), table[t - 1].item(), 0.5)
        assert up * abar[t - 1].sqrt().item() == pytest.approx(schedule.posterior_variance[t].double().sqrt().item(), rel=1e-4)
        assert up_half == pytest.approx(0.5 * up, rel=1e-6)
        for eta, want in [(1.0, up), (0.5, up_half)]:
            z = torch.randn(1, 1, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
            x = stochastic.ddim(zero, torch.zeros(1, 1, dtype=torch.float64), table[[t, t - 1]],
                                torch.Generator().manual_seed(t), eta=eta)
            assert x.item() == pytest.approx(want * z.item(), rel=1e-6)


def test_eps_scaling_schedules_and_the_identity_shortcut():
    unit_eps = lambda x, sigma: x - bcast(sigma, x)  # noqa: E731  (eps = (x - D) / sigma = 1)
    flat = ddpm(sampling={"options": {"eps_scale_schedule": "linear", "eps_scale_slope": 0.0}})  # lambda = 1 whichever the schedule
    assert scale_eps(unit_eps, 1.0) is unit_eps and scale_eps(unit_eps, flat.eps_lambda(1.0)) is unit_eps
    # t = 99 is the top level of the T = 100 table (lambda_t reads t from sigma, so only trained levels exist)
    x, t = torch.zeros(3, 2, dtype=torch.float64), torch.tensor([0, 10, 99])
    sigma = flat.level_sigmas[t]
    torch.testing.assert_close(eps_of(scale_eps(unit_eps, 2.0), x, sigma), torch.full((3, 2), 0.5, dtype=torch.float64))
    linear = ddpm(sampling={"options": {"eps_scale_schedule": "linear", "eps_scale_slope": 0.01}})  # lambda_t = 1 + 0.01 t
    torch.testing.assert_close(eps_of(scale_eps(unit_eps, linear.eps_lambda(1.0)), x, sigma)[:, 0], 1 / (1 + 0.01 * t.double()))
    # scale_eps itself takes any lambda(sigma)
    by_sigma = eps_of(scale_eps(unit_eps, lambda sg: 1 + 0.01 * sg), x, sigma)
    torch.testing.assert_close(by_sigma, (1 / (1 + 0.01 * sigma))[:, None].expand(3, 2))


def test_shift_levels_can_reach_the_top_level_and_no_further():
    schedule = DiscreteSchedule(make_betas("linear", 100))
    pure_noise = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))  # element variance 1: the top level fits
    levels = shift_levels(pure_noise, 98, schedule, window=3, lowest=0, data_var=torch.tensor(0.0))
    assert levels.max() == 99 and levels.min() >= 95


def test_exposure_summary_against_hand_computed_moments():
    """Two steps, three rows each: the per-step variances, Ning et al.'s delta = (sqrt(s) - sqrt(q))^2, the
    unbiased across-row marginal variance and the summary figures, from sums written out by hand."""
    from lightning_modules.exposure_bias import _summarise

    class Nfe:
        def nfe(self, sampler, steps):
            return 7

    count = [torch.tensor(3.0), torch.tensor(3.0)]
    rows = torch.tensor([[1.0, 2.0], [3.0, 5.0], [4.0, 4.0]])  # three rows' values of a 2-element sample at step 0
    s1 = [rows.sum(0), 2 * rows.sum(0)]
    s2 = [(rows**2).sum(0), 4 * (rows**2).sum(0)]
    sums = {"count": count, "t": [torch.tensor(30.0), torch.tensor(0.0)], "q_var": [torch.tensor(3.0), torch.tensor(0.3)],
            "sampler_sq": [torch.tensor(12.0), torch.tensor(0.6)], "err_sampler": [torch.tensor(6.0), torch.tensor(3.0)],
            "err_forward": [torch.tensor(3.0), torch.tensor(3.0)], "s1": s1, "s2": s2, "f1": s1, "f2": s2}
    out = _summarise(Nfe(), sums, "ddim", 2)
    torch.testing.assert_close(out["t"], torch.tensor([10.0, 0.0]))
    torch.testing.assert_close(out["q_var"], torch.tensor([1.0, 0.1]))
    torch.testing.assert_close(out["sampler_var"], torch.tensor([4.0, 0.2]))
    torch.testing.assert_close(out["delta"], torch.tensor([1.0, (0.2**0.5 - 0.1**0.5) ** 2]))
    unbiased = rows.var(0, unbiased=True).mean()
    torch.testing.assert_close(out["marginal_var_sampler"], torch.stack([unbiased, 4 * unbiased]))
    assert out["delta_sum"] == pytest.approx(float(out["delta"].sum())) and out["nfe"] == 7
    assert out["mean_gap"] == pytest.approx((3.0 + 0.1) / 2) and out["mean_ratio"] == pytest.approx((4.0 + 2.0) / 2)
    assert set(PER_STEP) <= set(out)


def test_exposure_of_a_conditional_model_passes_each_rows_cond():
    """A conditional exact eps (data modes shifted by cond): the measurement's denoiser and sampler must see each
    row's own cond; with it the perfect ancestral sampler keeps the forward marginal, as without cond."""
    from test_teachers import CondDDPMNet, mixture_for

    module = DDPM(nn.Identity(), None, data_shape=(2,), cond_dim=2, num_timesteps=100, sampling={"options": {"variance": "posterior"}})
    module.net = CondDDPMNet(module.schedule, "eps")
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(256, 2, generator=g) * 3
    x0 = torch.cat([m.sample(1, g) for m in mixture_for(cond)])
    ex = measure_exposure_bias(module, x0, "ancestral", None, torch.Generator().manual_seed(1), cond=cond, batch_size=128)
    ratio = ex["marginal_var_sampler"] / ex["marginal_var_forward"]
    assert (ratio - 1).abs().max() < 5 * math.sqrt(2 / 256) * 2, ratio  # both columns are sample variances of 256 rows


def test_a_constant_eps_scale_ignores_the_linear_slope():
    constant = ddpm(sampling={"options": {"eps_scale": 2.0, "eps_scale_schedule": "constant", "eps_scale_slope": 0.5}})
    linear = ddpm(sampling={"options": {"eps_scale": 2.0, "eps_scale_schedule": "linear", "eps_scale_slope": 0.5}})
    t = torch.tensor([0, 5, 9])
    x, sigma = torch.ones(3, 2, dtype=torch.float64), constant.level_sigmas[t]
    eps = lambda x, sigma: x + constant.level_of(sigma)[:, None].to(x.dtype)  # noqa: E731  (eps = x + t)
    denoiser = lambda x, sigma: x - bcast(sigma, x) * eps(x, sigma)  # noqa: E731
    assert constant.eps_lambda(2.0) == 2.0
    torch.testing.assert_close(eps_of(scale_eps(denoiser, constant.eps_lambda(2.0)), x, sigma), eps(x, sigma) / 2.0)
    torch.testing.assert_close(eps_of(scale_eps(denoiser, linear.eps_lambda(2.0)), x, sigma),
                               eps(x, sigma) / (2.0 + 0.5 * t[:, None]))
