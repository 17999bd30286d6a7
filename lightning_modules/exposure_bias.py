"""How far a DDPM sampler's states drift from the forward process: the exposure-bias measurements.

measure_exposure_bias follows Ning et al. 2024 ("Elucidating the Exposure Bias in Diffusion Models",
ICLR 2024): start the sampler from x_T ~ q(x_T | x0) for real x0, and at each visited level t compare the
sampler's x^_t with the forward process's q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I).
"""

from __future__ import annotations

import torch

from lightning_modules.ddpm import DDPM
from lightning_modules.schedules import extract
from samplers.core import bcast

PER_STEP = (
    "t", "q_var", "sampler_var", "gap", "ratio", "delta", "err_sampler", "err_forward",
    "marginal_var_sampler", "marginal_var_forward",
)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).double()


@torch.no_grad()
def measure_exposure_bias(
    module: DDPM,
    x0: torch.Tensor,
    sampler: str = "ancestral",
    steps: int | None = None,
    generator: torch.Generator | None = None,
    cond: torch.Tensor | None = None,
    batch_size: int | None = None,
    eta: float | None = None,
    eps_scale: float | None = None,
    time_shift_window: int | None = None,
    ddim_spacing: str | None = None,
) -> dict:
    """Exposure bias of `module`'s sampler on real data x0 (N, ...), per visited step and summed.

    Each row starts at x_T = q_sample(x0, T-1, z) and runs `sampler` ('ancestral' over all T levels or
    'ddim' with `steps`, with the module's eta / Epsilon Scaling / time shift / DDIM spacing unless overridden) exactly as
    module.sample would. At each visited step i, with level t (averaged over rows when time shifting makes it
    differ) and D elements per sample:

      q_var        1 - abar_t, the forward process's variance around sqrt(abar_t) x0;
      sampler_var  mean over rows and elements of (x^_t - sqrt(abar_t) x0)^2: the sampler's variance around
                   the same centre (uncentred: under q the difference has mean 0);
      gap, ratio   sampler_var - q_var and sampler_var / q_var;
      delta        Ning et al.'s variance error delta_t = (sqrt(sampler_var) - sqrt(q_var))^2; their
                   Delta = sum_t delta_t is `delta_sum`. (Their code averages per-pixel standard deviations
                   over samples; we take the root of the pooled second moment, the same in the limit.)
      err_sampler  mean (x0_hat(x^_t, t) - x0)^2: the denoiser's x0 error on the sampler's own inputs;
      err_forward  the same on x_t = q_sample(x0, t, fresh noise), the inputs it was trained on;
      marginal_var_sampler / marginal_var_forward
                   per-element variance across rows of x^_t and of the forward x_t, averaged over elements.

    Read with care: the first columns condition on x0, and a sampler started from x_T forgets most of x0
    (abar_T ~ 0), so even a Bayes-optimal denoiser ends with sampler_var ~ 2 Var(x0) >> q_var at small t
    (Ning et al.'s own multi-step numbers show it). They measure exposure bias in the paper's sense. The
    marginal columns compare distributions, not pairs: for an exact sampler they agree at every t.

    Returns per-step float64 tensors (PER_STEP keys) and scalars delta_sum, mean_gap, mean_ratio, nfe.
    The sampler's noise comes from `generator` (x_T first), the forward noise from a generator seeded from
    it, so the sampled trajectories are those of module.sample(x_T=...) with the same generator.
    """
    n, device = x0.shape[0], x0.device
    batch_size = batch_size or n
    sampler = sampler or module.sampler
    schedule = module.schedule
    top = module.num_timesteps - 1
    z = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    x_T = schedule.q_sample(x0, torch.full((n,), top, dtype=torch.long, device=device), z)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())
    forward_gen = torch.Generator(device=device).manual_seed(seed)

    sums: dict[str, list] = {}
    was_training = module.training
    module.eval()  # dropout off, as when sampling for real; restored below
    try:
        _run(module, x0, x_T, cond, batch_size, sampler, steps, generator, forward_gen, sums,
             dict(eta=eta, eps_scale=eps_scale, time_shift_window=time_shift_window, ddim_spacing=ddim_spacing))
    finally:
        module.train(was_training)
    return _summarise(module, sums, sampler, steps)


def _run(module, x0, x_T, cond, batch_size, sampler, steps, generator, forward_gen, sums, sample_kwargs):
    schedule, n, device = module.schedule, x0.shape[0], x0.device

    def add(i: int, key: str, value: torch.Tensor) -> None:
        column = sums.setdefault(key, [])
        if len(column) <= i:
            column.append(torch.zeros_like(value))
        column[i] = column[i] + value

    def denoise(x, t, c):
        x0_hat, _ = schedule.x0_and_eps(x, t, module.eps(x, t, c), module.clip_denoised)
        return x0_hat

    for start in range(0, n, batch_size):
        rows = slice(start, min(start + batch_size, n))
        x0_b, c_b = x0[rows], None if cond is None else cond[rows]

        def watch(i, sigma, x_ve, x0_b=x0_b, c_b=c_b):
            # The samplers step in the VE form; the measurements are Ning et al.'s, in VP coordinates at level t.
            t = module.level_of(sigma).round().long()
            x = x_ve * bcast(torch.rsqrt(1 + sigma.double() ** 2), x_ve)
            a = extract(schedule.alphas_cumprod, t, x)
            noise = torch.randn(x.shape, generator=forward_gen, device=device, dtype=x.dtype)
            x_fwd = schedule.q_sample(x0_b, t, noise)
            both = denoise(torch.cat([x, x_fwd]), torch.cat([t, t]), None if c_b is None else torch.cat([c_b, c_b]))
            hat_s, hat_f = both[: x.shape[0]], both[x.shape[0] :]
            add(i, "count", torch.tensor(float(x.shape[0]), dtype=torch.float64, device=device))
            add(i, "t", t.double().sum())
            add(i, "q_var", (1 - a.flatten().double()).sum())
            add(i, "sampler_sq", _rows(x - a.sqrt() * x0_b).pow(2).mean(1).sum())
            add(i, "err_sampler", _rows(hat_s - x0_b).pow(2).mean(1).sum())
            add(i, "err_forward", _rows(hat_f - x0_b).pow(2).mean(1).sum())
            add(i, "s1", _rows(x).sum(0))
            add(i, "s2", _rows(x).pow(2).sum(0))
            add(i, "f1", _rows(x_fwd).sum(0))
            add(i, "f2", _rows(x_fwd).pow(2).sum(0))

        module.sample(
            x0_b.shape[0], cond=c_b, sampler=sampler, steps=steps, generator=generator, x_T=x_T[rows], callback=watch, **sample_kwargs,
        )


def _summarise(module, sums: dict, sampler: str, steps: int | None) -> dict:
    sums = {k: [v.cpu() for v in column] for k, column in sums.items()}
    count = torch.stack(sums["count"])
    mean = {k: torch.stack(sums[k]) / count for k in ("t", "q_var", "sampler_sq", "err_sampler", "err_forward")}

    def across_rows(first: str, second: str) -> torch.Tensor:
        m1 = torch.stack(sums[first]) / count[:, None]
        m2 = torch.stack(sums[second]) / count[:, None]
        return ((m2 - m1**2) * count[:, None] / (count[:, None] - 1).clamp(min=1)).mean(1)

    q_var, sampler_var = mean["q_var"], mean["sampler_sq"]
    delta = (sampler_var.sqrt() - q_var.sqrt()) ** 2
    out = {
        "t": mean["t"],
        "q_var": q_var,
        "sampler_var": sampler_var,
        "gap": sampler_var - q_var,
        "ratio": sampler_var / q_var,
        "delta": delta,
        "err_sampler": mean["err_sampler"],
        "err_forward": mean["err_forward"],
        "marginal_var_sampler": across_rows("s1", "s2"),
        "marginal_var_forward": across_rows("f1", "f2"),
    }
    out.update(
        delta_sum=float(delta.sum()),
        mean_gap=float(out["gap"].mean()),
        mean_ratio=float(out["ratio"].mean()),
        nfe=module.nfe(sampler, steps),
    )
    return out
