"""Samplers and likelihoods for a score SDE (Song et al. 2021), as plain functions of a score.

`score_fn(x, t) -> grad_x log p_t(x)` with t a (B,) float tensor; `sde` is one of
lightning_modules.sde. Every sampler integrates from t = T down to t = eps on the
grid t_0 = T > t_1 > ... > t_N = eps (N = steps) and can end with a denoising
step at eps, Tweedie's E[x_0 | x_eps] = (x + std^2 s) / mean_scale (one more NFE),
the same last step as NCSN's annealed Langevin.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from lightning_modules.sde import SDE, bcast
from difflab.errors import ConfigError

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PREDICTORS = ("reverse_diffusion", "euler_maruyama")
CORRECTORS = ("langevin", "none")
ODE_SOLVERS = ("euler", "heun")
PROBES = ("rademacher", "gaussian")


def time_grid(sde: SDE, steps: int, eps: float, device=None) -> torch.Tensor:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(sde.T, eps, steps + 1, dtype=torch.float64, device=device)


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _times(t: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)


def denoise_step(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, t: float) -> torch.Tensor:
    """Tweedie's formula at time t: the posterior mean of x_0 given x_t."""
    tt = _times(t, x)
    mean_scale, std = sde.marginal(tt)
    return (x + bcast(std**2, x) * score_fn(x, tt)) / bcast(mean_scale, x)


# --- one step of each kind, from t to t - dt ----------------------------------------------------------


def euler_maruyama_step(score_fn, sde, x, t, dt, generator):
    """Reverse SDE, Euler-Maruyama (Song et al. 2021, eq. 6 with dt < 0)."""
    tt = _times(t, x)
    x_mean = x - sde.reverse_drift(x, tt, score_fn(x, tt)) * dt
    return x_mean + bcast(sde.diffusion(tt), x) * math.sqrt(dt) * _noise(x, generator)


def reverse_diffusion_step(score_fn, sde, x, t, dt, generator):
    """Reverse of the SDE's own discretization (Song et al. 2021, eq. 46): ancestral sampling for VP/VE."""
    tt = _times(t, x)
    update, G = sde.reverse_discretize(x, tt, dt, score_fn(x, tt))
    return x + update + bcast(G, x) * _noise(x, generator)


def langevin_corrector_step(score_fn, x, t, snr, generator):
    """Song et al. 2021, Algorithm 4: step 2 (snr ||z|| / ||s||)^2, so the noise-to-signal ratio of the update is fixed.

    The norms are averaged over the batch, as in the paper: a per-sample ||s(x)|| would make the step size a
    function of x, and Langevin with an x-dependent step no longer leaves p_t invariant (in 2-D it visibly
    shifts mass between modes). The paper's extra factor alpha_i = 1 - beta_i for VP is left out: it is
    within 2% of 1 for N >= 1000.
    """
    tt = _times(t, x)
    score = score_fn(x, tt)
    z = _noise(x, generator)
    ratio = z.flatten(1).norm(dim=1).mean() / score.flatten(1).norm(dim=1).mean().clamp(min=1e-12)
    step = 2 * (snr * ratio) ** 2
    return x + step * score + (2 * step).sqrt() * z


# --- samplers ------------------------------------------------------------------------------------------


def _check_discretization(sde: SDE, x: torch.Tensor, dt: float, steps: int) -> None:
    """VP's chain is DDPM's with beta_i = beta(t) dt (first order, as in the paper): it needs beta_max dt < 1."""
    f, G = sde.discretize(x[:1], _times(sde.T, x[:1]), dt)
    if not (torch.isfinite(f).all() and torch.isfinite(G).all()):
        raise ValueError(
            f"the reverse-diffusion predictor with {steps} steps takes steps too large for this SDE's discretization "
            "(VP: beta_max * dt must stay below 1): raise model.sample_steps (VP with beta_max=20: > 20 steps) "
            "or use model.predictor=euler_maruyama, or sampler=ode / ode_adaptive"
        )


@torch.no_grad()
def euler_maruyama(
    score_fn: ScoreFn, sde: SDE, x_T: torch.Tensor, steps: int = 1000, eps: float = 1e-3, denoise: bool = True,
    generator: torch.Generator | None = None, progress: bool = False,
) -> torch.Tensor:
    grid = time_grid(sde, steps, eps).tolist()
    x = x_T
    for k in tqdm(range(steps), disable=not progress, desc=f"euler-maruyama-{steps}"):
        x = euler_maruyama_step(score_fn, sde, x, grid[k], grid[k] - grid[k + 1], generator)
    return denoise_step(score_fn, sde, x, eps) if denoise else x


@torch.no_grad()
def predictor_corrector(
    score_fn: ScoreFn, sde: SDE, x_T: torch.Tensor, steps: int = 1000, predictor: str = "reverse_diffusion",
    corrector: str = "langevin", snr: float = 0.16, n_corrector_steps: int = 1, eps: float = 1e-3, denoise: bool = True,
    generator: torch.Generator | None = None, progress: bool = False,
) -> torch.Tensor:
    """Song et al. 2021, Algorithm 1-3: at each t, n Langevin corrector steps on p_t, then one predictor step to the next t."""
    if predictor not in PREDICTORS:
        raise ConfigError(f"model.predictor must be one of {PREDICTORS}, got {predictor!r}")
    if corrector not in CORRECTORS:
        raise ConfigError(f"model.corrector must be one of {CORRECTORS}, got {corrector!r}")
    predict = reverse_diffusion_step if predictor == "reverse_diffusion" else euler_maruyama_step
    n_corr = n_corrector_steps if corrector == "langevin" else 0
    grid = time_grid(sde, steps, eps).tolist()
    if predictor == "reverse_diffusion":
        _check_discretization(sde, x_T, grid[0] - grid[1], steps)
    x = x_T
    for k in tqdm(range(steps), disable=not progress, desc=f"pc-{steps}"):
        for _ in range(n_corr):
            x = langevin_corrector_step(score_fn, x, grid[k], snr, generator)
        x = predict(score_fn, sde, x, grid[k], grid[k] - grid[k + 1], generator)
    return denoise_step(score_fn, sde, x, eps) if denoise else x


def _ode_velocity(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, t: float) -> torch.Tensor:
    tt = _times(t, x)
    return sde.reverse_drift(x, tt, score_fn(x, tt), probability_flow=True)


@torch.no_grad()
def probability_flow_ode(
    score_fn: ScoreFn, sde: SDE, x_T: torch.Tensor, steps: int = 100, solver: str = "heun", eps: float = 1e-3,
    denoise: bool = True, progress: bool = False,
) -> torch.Tensor:
    """Probability-flow ODE (Song et al. 2021, eq. 13) with fixed steps: Euler, or Heun's 2nd order (2 NFE per step)."""
    if solver not in ODE_SOLVERS:
        raise ConfigError(f"model.ode_solver must be one of {ODE_SOLVERS}, got {solver!r}")
    grid = time_grid(sde, steps, eps).tolist()
    x = x_T
    for k in tqdm(range(steps), disable=not progress, desc=f"ode-{solver}-{steps}"):
        dt = grid[k] - grid[k + 1]
        v = _ode_velocity(score_fn, sde, x, grid[k])
        x_next = x - v * dt
        if solver == "heun":
            x_next = x - 0.5 * (v + _ode_velocity(score_fn, sde, x_next, grid[k + 1])) * dt
        x = x_next
    return denoise_step(score_fn, sde, x, eps) if denoise else x


def ode_nfe(steps: int, solver: str, denoise: bool) -> int:
    return steps * (2 if solver == "heun" else 1) + int(denoise)


def _solve_ivp(fun, t_span, y0: np.ndarray, rtol: float, atol: float):
    from scipy.integrate import solve_ivp

    sol = solve_ivp(fun, t_span, y0, rtol=rtol, atol=atol, method="RK45")
    if not sol.success:
        raise RuntimeError(f"RK45 failed: {sol.message} (try looser model.rtol / model.atol)")
    return sol


@torch.no_grad()
def probability_flow_ode_adaptive(
    score_fn: ScoreFn, sde: SDE, x_T: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-5, eps: float = 1e-3,
    denoise: bool = True,
) -> tuple[torch.Tensor, int]:
    """Probability-flow ODE with scipy's RK45 over the whole batch as one system; returns (samples, NFE).

    The step size is set by the hardest sample in the batch, as in Song et al.'s code.
    """
    shape, device, dtype = x_T.shape, x_T.device, x_T.dtype

    def fun(t, y):
        x = torch.from_numpy(y).to(device=device, dtype=dtype).reshape(shape)
        return _ode_velocity(score_fn, sde, x, t).double().cpu().numpy().reshape(-1)

    sol = _solve_ivp(fun, (sde.T, eps), x_T.double().cpu().numpy().reshape(-1), rtol, atol)
    x = torch.from_numpy(sol.y[:, -1]).to(device=device, dtype=dtype).reshape(shape)
    nfe = int(sol.nfev)
    if denoise:
        x, nfe = denoise_step(score_fn, sde, x, eps), nfe + 1
    return x, nfe


# --- likelihood --------------------------------------------------------------------------------------


def ode_log_likelihood(
    score_fn: ScoreFn, sde: SDE, x: torch.Tensor, probe: str = "rademacher", rtol: float = 1e-5, atol: float = 1e-5,
    eps: float = 1e-5, generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, int]:
    """log p_eps(x) in nats per sample through the probability-flow ODE (Song et al. 2021, Appendix D.2).

    d log p_t(x(t)) / dt = -div v(x(t), t) along the ODE, so
    log p_eps(x) = log p_T(x(T)) + int_eps^T div v dt, integrated with x by RK45.
    div v is Hutchinson's estimate E[z^T (dv/dx) z] with one probe z per sample held
    fixed over the whole integration (FFJORD, Grathwohl et al. 2019); Rademacher
    probes have the lower variance. Returns (log-likelihoods (B,), NFE).
    """
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
    shape, device, dtype = x.shape, x.device, x.dtype
    n, d = shape[0], x[0].numel()
    z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if probe == "rademacher":
        z = z.sign()

    def fun(t, y):
        state = torch.from_numpy(y[: n * d]).to(device=device, dtype=dtype).reshape(shape)
        with torch.inference_mode(False), torch.enable_grad():
            state = state.clone().requires_grad_(True)
            v = _ode_velocity(score_fn, sde, state, t)
            (vjp,) = torch.autograd.grad((v * z).sum(), state)
        div = (vjp * z).flatten(1).sum(1)
        return np.concatenate([v.detach().double().cpu().numpy().reshape(-1), div.double().cpu().numpy()])

    y0 = np.concatenate([x.detach().double().cpu().numpy().reshape(-1), np.zeros(n)])
    sol = _solve_ivp(fun, (eps, sde.T), y0, rtol, atol)
    y_T = sol.y[:, -1]
    x_T = torch.from_numpy(y_T[: n * d]).reshape(shape)
    delta_logp = torch.from_numpy(y_T[n * d :])
    logp = sde.prior_logp(x_T) + delta_logp
    return logp.to(device), int(sol.nfev)


def dequantize(x: torch.Tensor, num_levels: int = 256, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform dequantization of [-1, 1] data quantized to `num_levels` values: the integer k (x = 2k/(L-1) - 1)
    becomes y = 2 (k + u) / L - 1 with u ~ U[0, 1)^D, a continuous point in [-1, 1)."""
    k = torch.round((x + 1) / 2 * (num_levels - 1))
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return 2 * (k + u) / num_levels - 1


def bits_per_dim(
    module, x: torch.Tensor, cond=None, num_levels: int | None = 256, probe: str = "rademacher", rtol: float = 1e-5,
    atol: float = 1e-5, eps: float | None = None, generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, int]:
    """Bits per dimension of a batch under a score-SDE module (anything with `.sde`, `.score(x, t, cond)`, `.eps`).

    With `num_levels` (256 for 8-bit images in [-1, 1]) the data are dequantized
    and the result is an upper bound on the discrete data's bits/dim. The change
    of variables: v = k + u in [0, L)^D has density p_v(v) = p_y(y) |dy/dv| with
    y = 2v/L - 1, so log p_v = log p_y + D log(2/L), and
        bpd = -log p_v / (D ln 2) = -log p_y / (D ln 2) + log2(L / 2)   (+7 for L = 256),
    the offset Song et al. add for centered data. With num_levels=None the data
    are taken as continuous: bpd = -log p(x) / (D ln 2). Returns (bpd (B,), NFE).
    """
    y = x if num_levels is None else dequantize(x, num_levels, generator)
    eps = module.eps if eps is None else eps
    logp, nfe = ode_log_likelihood(lambda v, t: module.score(v, t, cond), module.sde, y, probe, rtol, atol, eps, generator)
    d = x[0].numel()
    bpd = -logp / (d * math.log(2))
    if num_levels is not None:
        bpd = bpd + math.log2(num_levels / 2)
    return bpd, nfe
