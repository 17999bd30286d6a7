"""Exact log-likelihood through the probability-flow ODE of any VE-form denoiser (Song et al. 2021, App. D.2).

In u = log sigma the ODE is dx/du = x - D(x; e^u), and d log p_u(x(u)) / du = -div(x - D), so

    log p_lo(x) = log p_hi(x(u_hi)) + int_{u_lo}^{u_hi} div(x - D) du,

integrated with x by RK45. The divergence is Hutchinson's estimate with one probe z per sample held fixed over the
integration (FFJORD), with the part of the identity's trace that is known added exactly (see below); Rademacher
probes have the lower variance.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from samplers.core import Denoiser, batch_sigma
from samplers.ode import _solve_ivp

PROBES = ("rademacher", "gaussian")


def gaussian_logp(z: torch.Tensor, std: float) -> torch.Tensor:
    """log N(z; 0, std^2 I) per sample."""
    d = z[0].numel()
    return -0.5 * d * math.log(2 * math.pi * std**2) - z.flatten(1).double().pow(2).sum(1) / (2 * std**2)


def log_likelihood(denoiser: Denoiser, x: torch.Tensor, sigma_lo: float, sigma_hi: float, prior_std: float,
                   probe: str = "rademacher", rtol: float = 1e-5, atol: float = 1e-5,
                   generator: torch.Generator | None = None, data_std: float = 0.5) -> tuple[torch.Tensor, int]:
    """log p_{sigma_lo}(x) in nats per sample (float64) with the prior N(0, prior_std^2 I) at sigma_hi; also the NFE.
    `data_std` only shapes the variance reduction of the trace estimate (any value is unbiased)."""
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
    if not 0 < sigma_lo < sigma_hi:
        raise ValueError(f"need 0 < sigma_lo < sigma_hi, got {sigma_lo}, {sigma_hi}")
    shape, device, dtype = x.shape, x.device, x.dtype
    n, d = shape[0], x[0].numel()
    z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if probe == "rademacher":
        z = z.sign()
    z2 = z.flatten(1).pow(2).sum(1)
    calls = [0]

    def fun(u, y):
        state = torch.from_numpy(y[: n * d]).to(device=device, dtype=dtype).reshape(shape)
        with torch.inference_mode(False), torch.enable_grad():
            state = state.clone().requires_grad_(True)
            d_hat = denoiser(state, batch_sigma(math.exp(u), state))
            (vjp,) = torch.autograd.grad((d_hat * z).sum(), state)
        calls[0] += 1
        v = state.detach() - d_hat.detach()
        # div(x - D) = c d + tr((1 - c) I - J_D) with c = sigma^2 / (sigma^2 + data_std^2), unbiased for any c: only
        # the second trace is estimated, and it is near 0 at both ends (J_D ~ I below the data scale, ~ 0 above it),
        # where estimating tr(I - J_D) or tr(J_D) whole would add noise of order ||z||^2 - d per unit of log sigma.
        c = math.exp(2 * u) / (math.exp(2 * u) + data_std**2)
        div = c * d + (1 - c) * z2 - (vjp * z).flatten(1).sum(1)
        return np.concatenate([v.detach().double().cpu().numpy().reshape(-1), div.double().cpu().numpy()])

    y0 = np.concatenate([x.detach().double().cpu().numpy().reshape(-1), np.zeros(n)])
    sol = _solve_ivp(fun, (math.log(sigma_lo), math.log(sigma_hi)), y0, rtol, atol)
    end = sol.y[:, -1]
    x_hi = torch.from_numpy(end[: n * d]).reshape(shape)
    logp = gaussian_logp(x_hi, prior_std) + torch.from_numpy(end[n * d :])
    return logp.to(device), calls[0]


def dequantize(x: torch.Tensor, num_levels: int = 256, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform dequantization of [-1, 1] data quantized to `num_levels` values: the integer k (x = 2k/(L-1) - 1)
    becomes y = 2 (k + u) / L - 1 with u ~ U[0, 1)^D, a continuous point in [-1, 1)."""
    k = torch.round((x + 1) / 2 * (num_levels - 1))
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return 2 * (k + u) / num_levels - 1
