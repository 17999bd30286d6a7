"""DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) on a discrete DDPM schedule: a second-order multistep solver of
the probability-flow ODE at one net evaluation per step, the same budget as DDIM.

DDIM is the first-order member of this family (DPM-Solver++1 in the data prediction): its error per step is
O(h) in h = lambda_s - lambda_t, lambda = log(alpha / sigma), and at 10 steps that truncation error, not exposure
bias, is what separates DDIM-10 from the 1000-step chain (benchmarks/RESULTS.md, exposure bias). 2M reuses the
previous step's x0 prediction to cancel the O(h) term:

    D_i = (1 + 1 / (2 r_i)) x0_i - 1 / (2 r_i) x0_(i-1),   r_i = h_(i-1) / h_i   (D_0 = x0_0)
    x_s = (sigma_s / sigma_t) x_t - alpha_s (exp(-h) - 1) D_i

The last step, from level 0 to the data (sigma = 0, h infinite), is first order (x = x0), as DDIM's last step is.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from lightning_modules.ddpm import EpsFn, StepCallback, _clip_x0, _full, _Trajectory, ddim_timesteps
from lightning_modules.schedules import DiscreteSchedule


@torch.no_grad()
def dpm_solver_2m_sample(
    eps_fn: EpsFn,
    schedule: DiscreteSchedule,
    x_T: torch.Tensor,
    steps: int = 10,
    clip_denoised: bool = False,
    progress: bool = False,
    callback: StepCallback | None = None,
    return_trajectory: bool = False,
    spacing: str = "uniform",
):
    """`steps` net evaluations on the levels of ddim_timesteps(spacing); callback / return_trajectory as in ddim_sample."""
    timesteps = ddim_timesteps(schedule.num_timesteps, steps, spacing, schedule).tolist()
    # Coefficients as Python floats, computed once on the host: no device sync inside the loop.
    lam = (-schedule.log_sigmas()).tolist()  # lambda_t = log(alpha_t / sigma_t)
    abar = schedule.alphas_cumprod.detach().double().cpu()
    alpha, sigma = abar.sqrt().tolist(), (1 - abar).sqrt().tolist()
    watch = _Trajectory(callback, return_trajectory)
    x, x0_prev, h_prev = x_T, None, None
    for k, t in enumerate(tqdm(timesteps, disable=not progress, desc=f"dpm++2m-{steps}")):
        level = _full(x.shape[0], t, x.device)
        watch(k, level, x)
        x0, _ = _clip_x0(schedule, x, level, eps_fn(x, level), clip_denoised)
        if k + 1 == len(timesteps):
            x = x0
            break
        s = timesteps[k + 1]
        h = lam[s] - lam[t]
        d = x0
        if x0_prev is not None:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = (sigma[s] / sigma[t]) * x - (alpha[s] * math.expm1(-h)) * d
        x0_prev, h_prev = x0, h
    return watch.result(x, return_trajectory)
