"""Stochastic samplers in VE form: DDIM with eta, DDPM's ancestral step, the reverse SDE and predictor-corrector.

Every step goes from sigma to sigma_next < sigma given D = D(x; sigma); a step to sigma_next = 0 returns D.
In VE form the forward chain is Markov with increments of variance sigma^2 - sigma_next^2, so its posterior is

    q(x_next | x, x0) = N(x0 + (sigma_next^2 / sigma^2) (x - x0), sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2),

DDPM's posterior for every method (for a DDPM, x_VE = x / sqrt(abar) turns Ho et al.'s eq. 7 into this).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import tqdm

import samplers.grids as grids
from samplers.core import Callback, Denoiser, Watch, batch_sigma, bcast, noise

VARIANCES = ("posterior", "beta")
# reread(i, x, sigma) -> (x, sigma): lets a wrapper re-read the state at other per-sample levels before a step
# (time-step shifting); sigma is (B,).
Reread = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def ddim_noise(s, s_next, eta: float):
    """(sigma_down, sigma_up) of DDIM's eq. 12 with eta in VE form: eta = 1 is the posterior above, eta = 0 Euler."""
    up = eta * (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5
    up = up.clamp(max=s_next) if torch.is_tensor(up) else min(up, s_next)
    return (s_next**2 - up**2) ** 0.5, up


def beta_noise(s, s_next):
    """(sigma_down, sigma_up) of Ho et al.'s sigma_t^2 = beta_t (the larger choice) around the posterior mean,
    through the VP embedding abar = 1 / (1 + sigma^2): beta / abar_next = (s^2 - s_next^2)(1 + s_next^2)/(1 + s^2)."""
    return s_next**2 / s, ((s**2 - s_next**2) * (1 + s_next**2) / (1 + s**2)) ** 0.5


def _step(d, x, s, s_next, down, up, generator):
    if up is None:
        return d + (down / s) * (x - d)
    return d + (down / s) * (x - d) + up * noise(x, generator)


@torch.no_grad()
def ddim(denoiser: Denoiser, x: torch.Tensor, sigmas, generator=None, callback: Callback | None = None, progress=False,
         eta: float = 0.0, variance: str = "posterior", reread: Reread | None = None):
    """Song et al. 2021, eq. 12: eta = 0 deterministic (Euler), eta = 1 DDPM's posterior variance.

    variance='beta' (eta = 1 only) takes Ho et al.'s sigma_t^2 = beta_t instead. `reread` lets a wrapper move each
    sample to another level before its step (lightning_modules.exposure_bias's time shifting).
    """
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    if variance == "beta" and eta != 1.0:
        raise ValueError("variance='beta' is Ho et al.'s ancestral step, eta = 1: use variance='posterior' with eta != 1")
    levels, watch = grids.check(sigmas), Watch(callback)
    for i in tqdm(range(len(levels) - 1), disable=not progress, desc="ddim"):
        s_next = levels[i + 1]
        s = batch_sigma(levels[i], x)
        if reread is not None:
            x, s = reread(i, x, s)
        watch(i, s, x)
        d = denoiser(x, s)
        if s_next == 0:
            x = d
            continue
        s_b = bcast(s, x)
        down, up = beta_noise(s_b, s_next) if variance == "beta" else ddim_noise(s_b, s_next, eta)
        x = _step(d, x, s_b, s_next, down, up if eta > 0 else None, generator)
    return x


def ancestral(denoiser: Denoiser, x, sigmas, generator=None, callback=None, progress=False, variance: str = "beta",
              reread: Reread | None = None):
    """DDPM's ancestral sampling (Ho et al. Algorithm 2) on any grid: the posterior mean plus noise of variance
    beta_t ('beta') or the posterior's ('posterior', the same as ddim with eta = 1)."""
    return ddim(denoiser, x, sigmas, generator, callback, progress, eta=1.0, variance=variance, reread=reread)


def _em_step(d, x, s: float, s_next: float, generator):
    """Euler-Maruyama on the reverse VE SDE dx = -d(sigma^2) score + dw, in sigma^2: score = (D - x) / sigma^2."""
    return x + ((s**2 - s_next**2) / s**2) * (d - x) + math.sqrt(s**2 - s_next**2) * noise(x, generator)


@torch.no_grad()
def euler_maruyama(denoiser: Denoiser, x: torch.Tensor, sigmas, generator=None, callback: Callback | None = None,
                   progress=False):
    """The reverse SDE (Song et al. 2021, eq. 6) in VE form, one step per level; D itself on a step to 0."""
    levels, watch = grids.check(sigmas), Watch(callback)
    for i in tqdm(range(len(levels) - 1), disable=not progress, desc="euler-maruyama"):
        s, s_next = levels[i], levels[i + 1]
        sig = batch_sigma(s, x)
        watch(i, sig, x)
        d = denoiser(x, sig)
        x = d if s_next == 0 else _em_step(d, x, s, s_next, generator)
    return x


def langevin_corrector_step(denoiser: Denoiser, x, s: float, snr: float, generator):
    """Song et al. 2021, Algorithm 4: step 2 (snr ||z|| / ||score||)^2 with the norms averaged over the batch.

    A per-sample ||score|| would make the step a function of x, and Langevin with an x-dependent step no longer
    leaves p_sigma invariant. The rule is invariant to rescaling x, so it is the same in VP and VE coordinates.
    """
    score = (denoiser(x, batch_sigma(s, x)) - x) / s**2
    z = noise(x, generator)
    ratio = z.flatten(1).norm(dim=1).mean() / score.flatten(1).norm(dim=1).mean().clamp(min=1e-12)
    step = 2 * (snr * ratio) ** 2
    return x + step * score + (2 * step).sqrt() * z


@torch.no_grad()
def pc(denoiser: Denoiser, x: torch.Tensor, sigmas, generator=None, callback: Callback | None = None, progress=False,
       snr: float = 0.16, n_corrector_steps: int = 1):
    """Predictor-corrector (Song et al. 2021, Algorithms 1-3): n Langevin corrector steps on p_sigma, then one
    reverse-SDE predictor step, at every level but a final 0 (where D itself is returned)."""
    if n_corrector_steps < 0:
        raise ValueError(f"n_corrector_steps must be >= 0, got {n_corrector_steps}")
    levels, watch = grids.check(sigmas), Watch(callback)
    for i in tqdm(range(len(levels) - 1), disable=not progress, desc="pc"):
        s, s_next = levels[i], levels[i + 1]
        sig = batch_sigma(s, x)
        watch(i, sig, x)
        if s_next == 0:
            x = denoiser(x, sig)
            continue
        for _ in range(n_corrector_steps):
            x = langevin_corrector_step(denoiser, x, s, snr, generator)
        x = _em_step(denoiser(x, sig), x, s, s_next, generator)
    return x
