"""MeanFlow against the exact average velocity of Gaussian data on the linear path.

For x0 ~ N(mu, s^2 I) and z_t = (1 - t) x0 + t n, z_t ~ N(m(t), S(t)^2 I) with m = (1 - t) mu and
S = sqrt((1 - t)^2 s^2 + t^2); the probability-flow map between two times is affine, z_r = m(r) + S(r) / S(t)
(z_t - m(t)), so the average velocity u(z_t, r, t) = (z_t - z_r) / (t - r) is closed form (and v(z_t, t) at r = t).
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from conftest import assert_loss_optimum_at_zero
from difflab.errors import ConfigError
from lightning_modules.edm import EDM
from lightning_modules.mean_flow import MeanFlow
from lightning_modules.nets import MLP

MU, S = torch.tensor([1.5, -0.5], dtype=torch.float64), 0.6


def m(t):
    return (1 - t)[:, None] * MU.to(t)


def std(t):
    return torch.sqrt((1 - t) ** 2 * S**2 + t**2)[:, None]


def exact_map(z, t, r):
    return m(r) + std(r) / std(t) * (z - m(t))


def exact_v(z, t):
    """d/dt of the map at r = t: m'(t) + S'(t) / S(t) (z - m(t))."""
    dstd = ((t - (1 - t) * S**2) / std(t)[:, 0])[:, None]
    return -MU.to(t) + dstd / std(t) * (z - m(t))


def exact_u(z, r, t):
    gap = (t - r)[:, None]
    safe = torch.where(gap > 0, gap, torch.ones_like(gap))
    return torch.where(gap > 0, (z - exact_map(z, t, r)) / safe, exact_v(z, t))


def sample_data(n, generator):
    return MU + S * torch.randn(n, 2, generator=generator, dtype=torch.float64)


def module(**kw) -> MeanFlow:
    return MeanFlow(MLP((2,), hidden=8, depth=1, cond_dim=MeanFlow.net_cond_dim(None)), partial(torch.optim.Adam),
                    data_shape=(2,), **kw)


def with_exact_u(mf: MeanFlow, a: torch.Tensor | None = None) -> MeanFlow:
    mf.average_velocity = lambda z, r, t, cond=None: exact_u(z.double(), r.double(), t.double()).to(z.dtype) + (0 if a is None else a * z)
    return mf


def draw(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = 0.05 + 0.9 * torch.rand(n, generator=g, dtype=torch.float64)
    r = t * torch.rand(n, generator=g, dtype=torch.float64)
    z = m(t) + std(t) * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return z, r, t


def test_the_exact_average_velocity_satisfies_the_meanflow_identity():
    """u = v - (t - r) d/dt u, the total derivative along (v, 0, 1) taken by torch.func.jvp, in float64."""
    mf = with_exact_u(module())
    z, r, t = draw()
    u, dudt = mf.total_derivative(z, r, t, exact_v(z, t), None)
    torch.testing.assert_close(u, exact_v(z, t) - (t - r)[:, None] * dudt, rtol=1e-9, atol=1e-9)


def test_the_exact_jvp_matches_central_differences_in_float64():
    mf = with_exact_u(module())
    z, r, t = draw(seed=1)
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _, exact = mf.total_derivative(z, r, t, v, None)
    mf.jvp_mode, mf.fd_step = "finite_difference", 1e-5
    _, fd = mf.total_derivative(z, r, t, v, None)
    torch.testing.assert_close(fd, exact, rtol=1e-7, atol=1e-7)


def test_the_loss_is_minimised_by_the_exact_average_velocity():
    """With plain squared error (adaptive_p = 0) the gradient along u + a z vanishes at a = 0; the conditional
    velocity n - x0 in the target averages to the marginal one, so a wrong identity would move the minimum."""
    a = torch.zeros((), dtype=torch.float64, requires_grad=True)
    mf = with_exact_u(module(adaptive_p=0.0, ratio_r_neq_t=0.5), a)
    assert_loss_optimum_at_zero(mf.loss, a, sample_data, 0.3, seed=3)


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_sampling_with_the_exact_average_velocity_is_the_exact_flow_map(steps):
    mf = with_exact_u(module())
    x_T = torch.randn(256, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x, nfe = mf.sample(256, steps=steps, x_T=x_T, return_nfe=True)
    t_max = torch.full((256,), mf.t_max, dtype=torch.float64)
    torch.testing.assert_close(x, exact_map(x_T, t_max, torch.zeros(256, dtype=torch.float64)), rtol=1e-10, atol=1e-10)
    assert nfe == steps == mf.nfe("mean_flow", steps)


def test_the_r_t_law():
    mf = module(ratio_r_neq_t=0.25)
    n = 200_000
    r, t = mf.draw_r_t(n, "cpu", torch.Generator().manual_seed(5))
    assert (r <= t).all()
    same = (r == t).double().mean().item()
    assert abs(same - 0.75) < 5 * math.sqrt(0.75 * 0.25 / n)
    # t is the larger of two draws of sigmoid(N(-0.4, 1)): P(t <= 1/2) = Phi(0.4)^2
    want = (0.5 * (1 + math.erf(0.4 / math.sqrt(2)))) ** 2
    got = (t <= 0.5).double().mean().item()
    assert abs(got - want) < 5 * math.sqrt(want * (1 - want) / n)


def test_a_trained_step_runs_through_a_real_net_with_the_exact_jvp():
    mf = module()
    loss = mf.loss({"x": sample_data(32, torch.Generator().manual_seed(6)).float()}, torch.Generator().manual_seed(7))
    loss.backward()
    assert torch.isfinite(loss) and mf.net.fc_out.weight.grad is not None


def test_samplers_and_nets_are_refused_in_one_line():
    mf = module()
    with pytest.raises(ConfigError, match="only sampler=mean_flow is defined"):
        mf.sample(2, sampler="euler")
    edm = EDM(MLP((2,), hidden=8, depth=1), partial(torch.optim.Adam), data_shape=(2,))
    with pytest.raises(ConfigError, match="needs a model=mean_flow checkpoint"):
        edm.sample(2, sampler="mean_flow")

    class CustomKernel(torch.autograd.Function):  # a custom op with a backward but no forward-mode rule
        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, grad):
            return 2 * grad

    class Untraceable(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, noise_level, cond=None):
            return self.w * CustomKernel.apply(x) * noise_level[:, None] / 999

    broken = MeanFlow(Untraceable(), partial(torch.optim.Adam), data_shape=(2,))
    batch = {"x": sample_data(8, torch.Generator().manual_seed(8)).float()}
    with pytest.raises(ConfigError, match=r"torch.func.jvp cannot trace this net .*model\.jvp=finite_difference"):
        broken.loss(batch)
    broken.jvp_mode = "finite_difference"
    assert torch.isfinite(broken.loss(batch))


def test_guidance_folded_into_training_mixes_the_models_unconditional_velocity_on_kept_rows():
    """cfg_scale = w: the field the JVP follows and the target uses is w (n - x0) + (1 - w) u(z, t, t | null) where the
    condition was kept, and n - x0 where it was dropped; w = 1 leaves the loss bitwise unchanged."""
    torch.manual_seed(0)
    net = MLP((2,), hidden=8, depth=1, cond_dim=MeanFlow.net_cond_dim(3))
    mf = MeanFlow(net, partial(torch.optim.Adam), data_shape=(2,), cond_dim=3, cfg_scale=2.5)
    mf.enable_cond_drop(0.5)
    batch = {"x": torch.randn(16, 2), "cond": torch.eye(3)[torch.arange(16) % 3]}
    dropped = mf.drop_cond(batch)
    seen = {}
    real = mf.total_derivative

    def spy(z, r, t, v, cond):
        seen.update(z=z, t=t, v=v)
        return real(z, r, t, v, cond)

    mf.total_derivative = spy
    mf.loss(dropped, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    r, t = mf.draw_r_t(16, "cpu", g)
    noise = torch.randn((16, 2), generator=g)
    plain = noise - batch["x"]
    null = mf.null_cond.expand(16, -1)
    with torch.no_grad():
        u_null = mf.average_velocity(seen["z"], seen["t"], seen["t"], null)
    kept = ~dropped["cond_dropped"]
    assert kept.any() and (~kept).any()
    torch.testing.assert_close(seen["v"][kept], (2.5 * plain + (1 - 2.5) * u_null)[kept])
    torch.testing.assert_close(seen["v"][~kept], plain[~kept])
    mf.cfg_scale = 1.0
    torch.testing.assert_close(mf.loss(dropped, torch.Generator().manual_seed(1)).detach(),
                               mf.loss({**dropped, "cond_dropped": None}, torch.Generator().manual_seed(1)).detach())
    with pytest.raises(ConfigError, match=r"model.cfg_scale needs the learned null condition"):
        MeanFlow(MLP((2,), hidden=8, depth=1, cond_dim=MeanFlow.net_cond_dim(3)), partial(torch.optim.Adam),
                 data_shape=(2,), cond_dim=3, cfg_scale=2.0).loss(batch)
