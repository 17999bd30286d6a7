"""Deterministic samplers of the probability-flow ODE in VE form, dx/dsigma = (x - D(x; sigma)) / sigma.

Euler is DDIM (eta = 0) for every method (Karras et al. 2022, Sec. 4); Heun is EDM's Algorithm 1/2;
DPM-Solver++(2M) (Lu et al. 2022) is second order in log sigma at one evaluation per step; `adaptive` is
RK45 in u = log sigma, where the ODE reads dx/du = x - D.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

import samplers.grids as grids
from samplers.core import Callback, Denoiser, Watch, batch_sigma, bcast, noise


@torch.no_grad()
def euler(denoiser: Denoiser, x: torch.Tensor, sigmas, generator=None, callback: Callback | None = None, progress=False):
    """x_next = D + sigma_next (x - D) / sigma: one evaluation per step, D itself on a step to 0."""
    levels, watch = grids.check(sigmas), Watch(callback)
    for i in tqdm(range(len(levels) - 1), disable=not progress, desc="euler"):
        s, s_next = levels[i], levels[i + 1]
        sig = batch_sigma(s, x)
        watch(i, sig, x)
        d = denoiser(x, sig)
        x = d + (s_next / s) * (x - d)
    return x


def heun_step(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One Heun step with per-sample levels (B,), both > 0 (consistency distillation's teacher step)."""
    s0, s1 = bcast(sigma, x), bcast(sigma_next, x)
    d0 = (x - denoiser(x, sigma)) / s0
    x_euler = x + (s1 - s0) * d0
    d1 = (x_euler - denoiser(x_euler, sigma_next)) / s1
    return x + (s1 - s0) * 0.5 * (d0 + d1)


# A step from above the data's scale (sigma > 1: the data are scaled to [-1, 1]) whose sigma_next / sigma is below
# 0.1 is taken first order (Euler = DDIM, one evaluation). There the slope (x - D) / sigma is the noise itself, which
# Euler follows exactly, while the trapezoid averages it with the slope at a data-scale sigma_next and applies that
# over the whole of sigma - sigma_next: from a cosine DDPM's sigma = 2e4 or flow matching's 999 it overshoots by
# orders of magnitude (exact Gaussian denoiser, 10 steps: mean error 5.4 against Euler's 0.062). Steps below the
# data scale keep Heun (0.12 -> 0.01 at the end of a linear DDPM grid is accurate second order), and EDM's own grids
# never come near the ratio (>= 0.3 at 18 steps).
HEUN_FIRST_ORDER_BELOW, HEUN_NOISE_SCALE = 0.1, 1.0


def heun_first_order(s: float, s_next: float) -> bool:
    return s_next == 0 or (s > HEUN_NOISE_SCALE and s_next / s < HEUN_FIRST_ORDER_BELOW)


@torch.no_grad()
def heun(denoiser: Denoiser, x: torch.Tensor, sigmas, generator=None, callback: Callback | None = None, progress=False,
         s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0):
    """Karras et al. Algorithm 2 (Algorithm 1 when s_churn = 0): two evaluations per step, one on a step to 0 and on
    a step from the noise regime that falls by more than 10x in sigma (first order there, see heun_first_order).

    With s_churn > 0 each step in [s_tmin, s_tmax] first raises the level by 1 + gamma with fresh noise.
    """
    levels, watch = grids.check(sigmas), Watch(callback)
    n = len(levels) - 1
    gamma_max = min(s_churn / max(n, 1), math.sqrt(2) - 1)  # beyond sqrt(2) - 1 churn adds more noise than is present
    for i in tqdm(range(n), disable=not progress, desc="heun"):
        s, s_next = levels[i], levels[i + 1]
        gamma = gamma_max if s_churn > 0 and s_tmin <= s <= s_tmax else 0.0
        s_hat = s * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(s_hat**2 - s**2) * s_noise * noise(x, generator)
        sig = batch_sigma(s_hat, x)
        watch(i, sig, x)
        if heun_first_order(s, s_next):  # at sigma = 0 the trapezoid's second slope (x - D) / sigma is undefined too
            d = denoiser(x, sig)
            x = d + (s_next / s_hat) * (x - d)
        else:
            x = heun_step(denoiser, x, sig, batch_sigma(s_next, x))
    return x


def second_order_ok(h_prev: float, h: float, min_ratio: float) -> bool:
    """2M's multistep correction weights the previous x0 by -1 / (2 r), r = h_prev / h: keep it only while r is
    not extreme (a large last step next to a small one makes that weight several times the estimate itself)."""
    return h_prev / h >= min_ratio


@torch.no_grad()
def dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, sigmas, generator=None, callback: Callback | None = None, progress=False,
             min_ratio: float = 0.5, lower_order_final: bool = False):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in VE form, lambda = -log sigma, h = lambda_next - lambda:

        D_i = (1 + 1 / (2 r)) D(x_i) - 1 / (2 r) D(x_(i-1)),   x_next = (sigma_next / sigma) x - expm1(-h) D_i,

    first order on the first step, on a step to 0 (h infinite: x = D) and where r < min_ratio (see
    second_order_ok; at 10 steps on DDPM's uniform grid the step to its last level has r = 0.14), and with
    lower_order_final on the last step to a positive level too (diffusers' option of that name).
    """
    levels, watch = grids.check(sigmas), Watch(callback)
    d_prev, h_prev = None, None
    for i in tqdm(range(len(levels) - 1), disable=not progress, desc="dpm++2m"):
        s, s_next = levels[i], levels[i + 1]
        sig = batch_sigma(s, x)
        watch(i, sig, x)
        d = denoiser(x, sig)
        if s_next == 0:
            x = d
            break
        h = math.log(s / s_next)
        dd = d
        last = i + 2 == len(levels) or levels[i + 2] == 0
        if d_prev is not None and second_order_ok(h_prev, h, min_ratio) and not (lower_order_final and last):
            r = h_prev / h
            dd = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * d_prev
        x = (s_next / s) * x - math.expm1(-h) * dd
        d_prev, h_prev = d, h
    return x


def _solve_ivp(fun, span, y0, rtol: float, atol: float):
    from scipy.integrate import solve_ivp  # only the adaptive solvers need scipy

    sol = solve_ivp(fun, span, y0, rtol=rtol, atol=atol, method="RK45")
    if not sol.success:
        raise RuntimeError(f"RK45 failed: {sol.message} (try looser rtol / atol)")
    return sol


@torch.no_grad()
def adaptive(denoiser: Denoiser, x: torch.Tensor, sigmas, generator=None, callback: Callback | None = None, progress=False,
             rtol: float = 1e-5, atol: float = 1e-5):
    """RK45 on dx/du = x - D(x; e^u) from the grid's first level to its last positive one, the whole batch as one
    system (the step size is the hardest sample's, as in Song et al.'s code); then D on a final 0."""
    levels = grids.check(sigmas)
    positive = [s for s in levels if s > 0]
    shape, device, dtype = x.shape, x.device, x.dtype
    watch = Watch(callback)
    calls = [0]

    def fun(u, y):
        state = torch.from_numpy(y).to(device=device, dtype=dtype).reshape(shape)
        sig = batch_sigma(math.exp(u), state)
        watch(calls[0], sig, state)
        calls[0] += 1
        return (state - denoiser(state, sig)).double().cpu().numpy().reshape(-1)

    if len(positive) > 1:
        sol = _solve_ivp(fun, (math.log(positive[0]), math.log(positive[-1])), x.double().cpu().numpy().reshape(-1), rtol, atol)
        x = torch.from_numpy(sol.y[:, -1]).to(device=device, dtype=dtype).reshape(shape)
    if levels[-1] == 0:
        x = denoiser(x, batch_sigma(positive[-1], x))
    return x
