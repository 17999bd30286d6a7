"""Flow matching against the exact velocity field of a Gaussian mixture.

For x_t = (1 - t) x0 + t n the marginal velocity is u(x, t) = E[n - x0 | x_t = x] = (x - E[x0 | x_t]) / t, and
E[x0 | x_t] is the mixture's denoiser in the VE form at sigma = t / (1 - t), read at x / (1 - t).
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from conftest import assert_loss_optimum_at_zero
from lightning_modules.flow_matching import FlowMatching
from lightning_modules.nets import MLP
from lightning_modules.teachers import teacher_from_module
from test_ddpm_samplers import MIXTURE, N, check_matches_mixture


def exact_velocity(mixture, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.double()
    x0 = mixture.denoiser(x.double() / (1 - t)[:, None], 1.0, t / (1 - t))
    return ((x.double() - x0) / t[:, None]).to(x.dtype)


def exact_path_velocity(mixture, path, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[d_alpha x0 + d_sigma n | x_t = x] on any affine path: x0 from the mixture's VE denoiser at sigma / alpha,
    n from x_t = alpha x0 + sigma n."""
    t = t.double()
    (alpha, sigma), (d_alpha, d_sigma) = path.marginal(t), path.d_marginal(t)
    x0 = mixture.denoiser(x.double() / alpha[:, None], 1.0, sigma / alpha)
    n = (x.double() - alpha[:, None] * x0) / sigma[:, None]
    return (d_alpha[:, None] * x0 + d_sigma[:, None] * n).to(x.dtype)


class ExactVelocityNet(torch.nn.Module):
    """The exact u(x, t) in a net's slot (noise level 999 t), plus `a` times the input: a line through the optimum."""

    def __init__(self, mixture, path=None):
        super().__init__()
        self.mixture, self.path = mixture, path
        self.a = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, noise_level, cond=None):
        t = noise_level / 999.0
        u = exact_velocity(self.mixture, x, t) if self.path is None else exact_path_velocity(self.mixture, self.path, x, t)
        return u + self.a * x


def flow(mixture=MIXTURE, **kw) -> FlowMatching:
    module = FlowMatching(MLP((2,), hidden=8, depth=1), partial(torch.optim.Adam), data_shape=(2,), **kw)
    module.net = ExactVelocityNet(mixture, None if kw.get("path", "linear") == "linear" else module.path)
    return module


def test_on_the_cosine_path_the_exact_velocity_minimises_the_loss_denoises_and_samples_the_mixture():
    """A new interpolant is one class (paths.CosinePath): its velocity target, its VE conversions and its prior
    make the exact field the loss's optimum, the mixture's denoiser, and a sampler of the mixture."""
    module = flow(path="cosine")
    assert_loss_optimum_at_zero(module.loss, module.net.a, MIXTURE.sample, 0.3, seed=11)
    module = flow(path="cosine")  # the check above leaves its probe in net.a
    g = torch.Generator().manual_seed(0)
    sigma = torch.exp(torch.empty(64).uniform_(-4, 4, generator=g)).double()
    x = MIXTURE.sample(64, generator=g).double() + sigma[:, None] * torch.randn(64, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(module.denoise(x, sigma), MIXTURE.denoiser(x, 1.0, sigma), rtol=1e-6, atol=1e-6)
    assert module.sigma_range[1] == pytest.approx(math.tan(0.4995 * math.pi)) and module.prior_std(1.0) == pytest.approx(math.sqrt(2))
    check_matches_mixture(module.sample(N, sampler="heun", steps=60, generator=torch.Generator().manual_seed(2)), MIXTURE)


@pytest.mark.parametrize("time_sampling", ["logit_normal", "uniform"])
def test_the_loss_is_minimised_by_the_exact_velocity(time_sampling):
    """The regression target n - x0 has conditional mean u(x_t, t): the gradient along u + a x vanishes at a = 0.
    A wrong target (x0 - n, or n alone) or a wrong interpolation moves the minimum."""
    module = flow(time_sampling=time_sampling)
    assert_loss_optimum_at_zero(module.loss, module.net.a, MIXTURE.sample, 0.3, seed=11)


def test_denoise_is_the_mixtures_ve_denoiser():
    module = flow()
    g = torch.Generator().manual_seed(0)
    sigma = torch.exp(torch.empty(64).uniform_(-4, 4, generator=g)).double()
    x = MIXTURE.sample(64, generator=g).double() + sigma[:, None] * torch.randn(64, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(module.denoise(x, sigma), MIXTURE.denoiser(x, 1.0, sigma), rtol=1e-6, atol=1e-6)
    lo, hi = module.sigma_range
    assert lo == pytest.approx(1e-5 / (1 - 1e-5)) and hi == pytest.approx(999.0)


def test_time_draws_follow_their_law():
    module = flow(logit_mean=0.5, logit_std=0.8)
    t = module.draw_t(200_000, "cpu", torch.Generator().manual_seed(1)).double()
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() - 0.5) < 5 * 0.8 / math.sqrt(len(t)) and abs(logit.std().item() - 0.8) < 0.01
    u = flow(time_sampling="uniform").draw_t(200_000, "cpu", torch.Generator().manual_seed(1)).double()
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.001


@pytest.mark.parametrize("sampler,steps,allowance", [("euler", 200, 0.05), ("heun", 60, 0.0), ("dpmpp_2m", 40, 0.0)])
def test_ode_samplers_with_the_exact_velocity_reproduce_the_mixture(sampler, steps, allowance):
    """Euler on the uniform t grid is rectified flow's own sampler (first order: a stated allowance); Heun and
    DPM-Solver++ run through the denoiser form with none."""
    x = flow().sample(N, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(2))
    check_matches_mixture(x, MIXTURE, allowance)


def test_euler_in_the_ve_form_is_euler_in_t():
    """x_{t'} = x_t + (t' - t) u(x_t, t) on the same grid: the VE-form Euler step is rectified flow's Euler step."""
    module = flow()
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(256, 2, generator=g)
    out = module.sample(256, sampler="euler", steps=8, x_T=noise)
    ts = torch.linspace(module.t_max, 0.0, 9, dtype=torch.float64).tolist()
    x = noise.double()
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t) * exact_velocity(MIXTURE, x, torch.full((256,), t, dtype=torch.float64))
    torch.testing.assert_close(out.double(), x, rtol=1e-4, atol=1e-4)


def test_flow_matching_is_a_distillation_teacher():
    module = flow()
    teacher = teacher_from_module(module)
    assert teacher.kind == "flow_matching" and (teacher.sigma_min, teacher.sigma_max) == module.sigma_range
    x, sigma = torch.randn(8, 2, generator=torch.Generator().manual_seed(4)), torch.full((8,), 2.0)
    torch.testing.assert_close(teacher.denoise(x, sigma), module.denoise(x, sigma))


def test_bad_settings_name_the_option():
    from difflab.errors import ConfigError

    for kw, key in [({"time_sampling": "beta"}, "time_sampling"), ({"t_max": 1.0}, "t_max"),
                    ({"sampling": {"sampler": "cm"}}, "model.sampling.sampler"), ({"path": "cosin"}, "model.path")]:
        with pytest.raises(ConfigError, match=key):
            FlowMatching(MLP((2,)), partial(torch.optim.Adam), data_shape=(2,), **kw)
