"""Identities between the generic VE-form samplers (samplers.ode, samplers.stochastic) on an exact denoiser.

In the VE form x = x0 + sigma n, DDIM's deterministic step x' = D + (sigma' / sigma)(x - D) is Euler's on the
probability-flow ODE dx/dsigma = (x - D) / sigma, and DPM-Solver++(2M)'s first-order step
x' = (sigma' / sigma) x - expm1(-h) D with h = log(sigma / sigma') is the same affine map. These hold on any
grid and any denoiser; the exact mixture denoiser (Tweedie's formula) stands in for a net.
"""

import torch

import samplers
from lightning_modules.analytic import GaussianMixture
from samplers import grids

MIXTURE = GaussianMixture(means=[[-2.0, 0.0], [2.0, 0.0], [0.0, 3.0]], stds=[0.3, 0.5, 0.4], weights=[0.2, 0.3, 0.5])


def exact_denoiser(x, sigma):
    return MIXTURE.denoiser(x, 1.0, sigma)


def start(n: int, sigma_max: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return MIXTURE.sample(n, g).double() + sigma_max * torch.randn(n, 2, generator=g, dtype=torch.float64)


def test_euler_is_ddim_with_eta_zero():
    sigmas = grids.append_zero(grids.karras(12, 0.002, 80.0))
    x = start(64, 80.0, 0)
    euler = samplers.get("euler").fn(exact_denoiser, x, sigmas)
    ddim = samplers.get("ddim").fn(exact_denoiser, x, sigmas, generator=torch.Generator().manual_seed(1), eta=0.0)
    torch.testing.assert_close(ddim, euler, rtol=1e-12, atol=1e-12)


def test_ddim_eta_one_is_ancestral_with_the_posterior_variance():
    sigmas = grids.append_zero(grids.karras(12, 0.002, 80.0))
    x = start(64, 80.0, 2)
    ddim = samplers.get("ddim").fn(exact_denoiser, x, sigmas, generator=torch.Generator().manual_seed(3), eta=1.0)
    ancestral = samplers.get("ancestral").fn(exact_denoiser, x, sigmas, generator=torch.Generator().manual_seed(3),
                                             variance="posterior")
    assert torch.equal(ddim, ancestral)
    beta = samplers.get("ancestral").fn(exact_denoiser, x, sigmas, generator=torch.Generator().manual_seed(3), variance="beta")
    assert (beta - ancestral).abs().max() > 1e-3  # the two variances differ, so the equality above is not vacuous


def test_dpmpp_2m_first_order_steps_are_euler_steps():
    """min_ratio above every step ratio makes every step first order: the whole solve is Euler's; one step is too."""
    sigmas = grids.append_zero(grids.karras(12, 0.002, 80.0))
    x = start(64, 80.0, 4)
    euler = samplers.get("euler").fn(exact_denoiser, x, sigmas)
    first_order = samplers.get("dpmpp_2m").fn(exact_denoiser, x, sigmas, min_ratio=float("inf"))
    torch.testing.assert_close(first_order, euler, rtol=1e-12, atol=1e-12)
    second_order = samplers.get("dpmpp_2m").fn(exact_denoiser, x, sigmas)
    assert (second_order - euler).abs().max() > 1e-3  # the default's multistep correction is really on here
    one = samplers.get("dpmpp_2m").fn(exact_denoiser, x, sigmas[:2])
    torch.testing.assert_close(one, samplers.get("euler").fn(exact_denoiser, x, sigmas[:2]), rtol=1e-12, atol=1e-12)
