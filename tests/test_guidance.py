"""Classifier-free guidance and condition dropout (issue 33) against exact denoisers.

A method's `denoise` is replaced by the exact VE-form denoiser of labelled Gaussian data (conditional on a one-hot
label, unconditional on the null condition), so what is measured is the guidance wrapper, the sampler and the NFE
count, not a net. What guidance samples is checked against the end point of the guided probability-flow ODE, which
for a Gaussian class inside a Gaussian marginal is affine in x and integrates to any precision; it is not the tilted
law p(x|c)^w p(x)^(1-w), and nothing here tests for that.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

import samplers
from difflab.errors import ConfigError
from lightning_modules.edm import EDM
from lightning_modules.nets import MLP
from samplers.guidance import Guided

MU = torch.tensor([[1.5, -1.0], [-1.0, 0.5]], dtype=torch.float64)  # class means
S_CLASS, S_MARGINAL = 0.3, 1.2  # class std; the unconditional model's N(0, S_MARGINAL^2)


def conditional(x, sigma, labels):
    s2, v = S_CLASS**2, sigma.double()[:, None] ** 2
    mu = MU[labels]
    return mu + s2 / (s2 + v) * (x.double() - mu)


def unconditional(x, sigma):
    v = sigma.double()[:, None] ** 2
    return S_MARGINAL**2 / (S_MARGINAL**2 + v) * x.double()


def exact_denoise(x, sigma, cond):
    """One-hot rows: the class's denoiser; the null condition (all zeros here): the unconditional one."""
    sigma = samplers.batch_sigma(sigma, x)
    labelled = cond.abs().sum(1) > 0.5
    out = unconditional(x, sigma)
    if labelled.any():
        out[labelled] = conditional(x[labelled], sigma[labelled], cond[labelled].argmax(1))
    return out.to(x.dtype)


def guided_module(cond_drop: float = 0.1) -> EDM:
    module = EDM(MLP((2,), hidden=8, depth=1, cond_dim=2), partial(torch.optim.Adam), data_shape=(2,), cond_dim=2)
    module.enable_cond_drop(cond_drop)
    module.denoise = exact_denoise
    return module


def one_hot(labels):
    return torch.nn.functional.one_hot(torch.as_tensor(labels), 2).double()


def test_w1_is_the_conditional_law_and_w0_the_unconditional_one():
    module = guided_module()
    n, g = 4000, torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    x = module.sample(n, cond=one_hot(labels), sampler="heun", steps=40, guidance=1.0, generator=g).double()
    for c in (0, 1):
        rows = x[labels == c]
        se = S_CLASS / math.sqrt(len(rows))
        assert (rows.mean(0) - MU[c]).abs().max() < 5 * se
        assert (rows.std(0) - S_CLASS).abs().max() < 5 * S_CLASS / math.sqrt(2 * len(rows))
    x0 = module.sample(n, cond=one_hot(labels), sampler="heun", steps=40, guidance=0.0, generator=g).double()
    assert (x0.std(0) - S_MARGINAL).abs().max() < 5 * S_MARGINAL / math.sqrt(2 * n) and x0.mean(0).abs().max() < 5 * S_MARGINAL / math.sqrt(n)


@pytest.mark.parametrize("w", [1.5, 3.0])
def test_the_guided_denoiser_is_the_combination_at_every_sigma(w):
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cond, null = one_hot([0, 1, 0, 1, 1, 0]), torch.zeros(6, 2, dtype=torch.float64)
    guided = Guided(exact_denoise, cond, null, w)
    for level in (80.0, 3.0, 0.4, 0.002):
        sigma = torch.full((6,), level, dtype=torch.float64)
        c, u = exact_denoise(x, sigma, cond), exact_denoise(x, sigma, null)
        torch.testing.assert_close(guided(x, sigma), u + w * (c - u), rtol=1e-12, atol=1e-12)
        assert guided.cost == 2


@pytest.mark.parametrize("w", [2.0, 4.0])
def test_the_guided_ode_ends_where_its_affine_flow_does(w):
    """D_w = a(sigma) x + b(sigma) for these Gaussians, so dx/dsigma = ((1 - a) x - b) / sigma is affine:
    x(sigma_end) = A x_T + B with A, B integrated by RK45 at rtol 1e-11, then the sampler's last step to 0, D_w."""
    from scipy.integrate import solve_ivp

    module = guided_module()
    n, label = 500, 0
    grid = module.grid("heun", 300).tolist()
    top, end = grid[0], grid[-2]
    s2, S2, mu = S_CLASS**2, S_MARGINAL**2, MU[label].numpy()

    def a(sig):
        return (1 - w) * S2 / (S2 + sig**2) + w * s2 / (s2 + sig**2)

    def b(sig):
        return w * sig**2 / (s2 + sig**2) * mu

    def flow(sig, y):  # y = [A, B_0, B_1]
        return [(1 - a(sig)) * y[0] / sig, *(((1 - a(sig)) * y[1:] - b(sig)) / sig)]

    sol = solve_ivp(flow, (top, end), [1.0, 0.0, 0.0], rtol=1e-11, atol=1e-13, method="RK45")
    A, B = sol.y[0, -1], torch.tensor(sol.y[1:, -1])
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * top
    x_end = A * x_T + B
    want = a(end) * x_end + torch.tensor(b(end))
    got = module.sample(n, cond=one_hot([label] * n), sampler="heun", steps=300, guidance=w, x_T=x_T).double()
    torch.testing.assert_close(got, want, rtol=0, atol=5e-4)  # Heun's own error at 300 steps: 2e-4
    # and it is not the conditional law: guidance moves the mean past the class's (both ways, a wrong w fails)
    assert (got.mean(0) - MU[label]).abs().max() > 0.05


def test_the_interval_guides_only_inside_and_nfe_counts_net_evaluations():
    module = guided_module()
    x = torch.randn(4, 2, dtype=torch.float64)
    cond, null = one_hot([0, 1, 1, 0]), torch.zeros(4, 2, dtype=torch.float64)
    guided = Guided(exact_denoise, cond, null, 3.0, interval=(0.5, 5.0))
    for level, inside in ((10.0, False), (5.0, True), (1.0, True), (0.5, True), (0.1, False)):
        sigma = torch.full((4,), level, dtype=torch.float64)
        out = guided(x, sigma)
        want = exact_denoise(x, sigma, cond)
        if inside:
            u = exact_denoise(x, sigma, null)
            want = u + 3.0 * (want - u)
        torch.testing.assert_close(out, want)
        assert guided.cost == (2 if inside else 1)
    plain = module.nfe("euler", 10)
    assert module.nfe("euler", 10, guidance=2.0) == 2 * plain and module.nfe("euler", 10, guidance=1.0) == plain
    _, spent = module.sample(8, cond=one_hot([0] * 8), sampler="euler", steps=10, guidance=2.0, return_nfe=True)
    assert spent == 2 * plain
    levels = module.grid("euler", 10).tolist()[:-1]
    inside = sum(0.5 <= s <= 5.0 for s in levels)
    _, spent = module.sample(8, cond=one_hot([0] * 8), sampler="euler", steps=10, guidance=2.0, guidance_interval=[0.5, 5.0],
                             return_nfe=True)
    assert spent == plain + inside and module.nfe("euler", 10, guidance=2.0, guidance_interval=[0.5, 5.0]) is None


def test_cfg_rescale_matches_the_std_of_the_conditional_estimate_by_its_share_phi():
    """Lin et al. 2024, Algorithm 2, on the x0 estimates: phi = 1 gives each guided sample the conditional estimate's
    std over its elements, phi = 0 is plain CFG, and in between the factor is the phi-mix of the two."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    cond_out, null_out = 2.0 * x + 0.5, 0.3 * x - 0.2

    def denoise(v, sigma, c):  # the condition picks one of two fixed maps of the state
        return torch.where(c[:, :1, None, None] > 0, 2.0 * v + 0.5, 0.3 * v - 0.2)

    cond, null = torch.ones(5, 1, dtype=torch.float64), torch.zeros(5, 1, dtype=torch.float64)
    sigma = torch.ones(5, dtype=torch.float64)
    plain = null_out + 4.0 * (cond_out - null_out)
    torch.testing.assert_close(Guided(denoise, cond, null, 4.0)(x, sigma), plain, rtol=0, atol=0)
    full = Guided(denoise, cond, null, 4.0, rescale=1.0)(x, sigma)
    torch.testing.assert_close(full.std((1, 2, 3)), cond_out.std((1, 2, 3)))
    factor = cond_out.std((1, 2, 3), keepdim=True) / plain.std((1, 2, 3), keepdim=True)
    torch.testing.assert_close(Guided(denoise, cond, null, 4.0, rescale=0.7)(x, sigma), plain * (0.7 * factor + 0.3))
    module = guided_module()
    with pytest.raises(ConfigError, match=r"guidance_rescale=1\.5 is not valid"):
        module.sample(2, cond=one_hot([0, 1]), guidance=2.0, guidance_rescale=1.5)
    with pytest.raises(ConfigError, match=r"pass guidance=w as well"):
        module.sample(2, cond=one_hot([0, 1]), guidance_rescale=0.7)
    assert module.sample(2, cond=one_hot([0, 1]), steps=3, guidance=2.0, guidance_rescale=0.7).shape == (2, 2)


def test_condition_dropout_replaces_its_share_with_the_learned_null_condition():
    module = guided_module(cond_drop=0.3)
    torch.manual_seed(3)
    with torch.no_grad():
        module.null_cond.copy_(torch.tensor([7.0, -7.0]))
    cond = one_hot(torch.arange(20000) % 2).float()
    out = module.drop_cond({"x": torch.zeros(20000, 2), "cond": cond})["cond"]
    dropped = (out == torch.tensor([7.0, -7.0])).all(1)
    kept = (out == cond).all(1)
    assert (dropped | kept).all()
    share, se = dropped.float().mean().item(), math.sqrt(0.3 * 0.7 / 20000)
    assert abs(share - 0.3) < 5 * se
    # the null condition is a parameter the loss reaches (it is learned, and EMA-averaged with the net)
    real = EDM(MLP((2,), hidden=8, depth=1, cond_dim=2), partial(torch.optim.Adam), data_shape=(2,), cond_dim=2)
    real.enable_cond_drop(0.5)
    torch.nn.init.normal_(real.net.fc_out.weight, std=0.1)  # the zero-initialised last layer passes no gradient back
    loss = real.loss(real.drop_cond({"x": torch.randn(64, 2), "cond": one_hot(torch.arange(64) % 2).float()}))
    loss.backward()
    assert real.null_cond.grad is not None and real.null_cond.grad.abs().sum() > 0
    assert "null_cond" in dict(real.named_parameters())


def test_guidance_is_refused_where_it_cannot_work():
    plain = EDM(MLP((2,), hidden=8, depth=1), partial(torch.optim.Adam), data_shape=(2,))
    with pytest.raises(ConfigError, match="needs a conditional model"):
        plain.sample(2, guidance=2.0)
    no_drop = EDM(MLP((2,), hidden=8, depth=1, cond_dim=2), partial(torch.optim.Adam), data_shape=(2,), cond_dim=2)
    with pytest.raises(ConfigError, match=r"retrain with model\.cond_drop=0\.1"):
        no_drop.sample(2, cond=one_hot([0, 1]).float(), guidance=2.0)
    module = guided_module()
    with pytest.raises(ConfigError, match=r"guidance=-1\.0 is not valid"):
        module.sample(2, cond=one_hot([0, 1]), guidance=-1.0)
    with pytest.raises(ConfigError, match=r"guidance_interval=\[5\.0, 1\.0\] is not valid"):
        module.sample(2, cond=one_hot([0, 1]), guidance=2.0, guidance_interval=[5.0, 1.0])
    with pytest.raises(ConfigError, match=r"model\.cond_drop needs a conditional model"):
        plain.enable_cond_drop(0.1)


def test_autoguidance_combines_the_model_with_its_weaker_guide_on_the_same_condition():
    """D_w = D_guide(x; c) + w (D(x; c) - D_guide(x; c)): no null condition, so an unconditional pair works too."""
    module = guided_module()
    weak = guided_module()

    def blurred(x, sigma, cond):  # a "weaker" model: the class's denoiser with a wider class
        s2 = (2 * S_CLASS) ** 2
        mu, v = MU[cond.argmax(1)], samplers.batch_sigma(sigma, x).double()[:, None] ** 2
        return (mu + s2 / (s2 + v) * (x.double() - mu)).to(x.dtype)

    weak.denoise = blurred
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    cond = one_hot([0, 1, 1, 0, 1, 0])
    guided = Guided(exact_denoise, cond, None, 2.5, guide=blurred)
    for level in (50.0, 1.0, 0.01):
        sigma = torch.full((6,), level, dtype=torch.float64)
        c, g = exact_denoise(x, sigma, cond), blurred(x, sigma, cond)
        torch.testing.assert_close(guided(x, sigma), g + 2.5 * (c - g), rtol=1e-12, atol=1e-12)
        assert guided.cost == 2
    _, spent = module.sample(8, cond=cond[:1].expand(8, -1), sampler="euler", steps=10, guidance=2.5, guide=weak, return_nfe=True)
    assert spent == 2 * module.nfe("euler", 10) == module.nfe("euler", 10, guidance=2.5, guide=weak)
    # an unconditional model takes a guide although it has no null condition
    plain = EDM(MLP((2,), hidden=8, depth=1), partial(torch.optim.Adam), data_shape=(2,))
    guide = EDM(MLP((2,), hidden=4, depth=1), partial(torch.optim.Adam), data_shape=(2,))
    assert plain.sample(3, guidance=2.0, guide=guide, steps=4).shape == (3, 2)
    with pytest.raises(ConfigError, match=r"the guide models data of shape \(3,\)"):
        plain.sample(3, guidance=2.0, guide=EDM(MLP((3,), hidden=4, depth=1), partial(torch.optim.Adam), data_shape=(3,)))
    with pytest.raises(ConfigError, match=r"needs a scale: pass guidance=w"):
        plain.sample(3, guide=guide)
