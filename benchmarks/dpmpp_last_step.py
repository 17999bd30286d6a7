"""DPM-Solver++(2M)'s step-ratio rule, measured on the exact denoiser of 1-D Gaussian data.

For x0 ~ N(0, s^2) the probability-flow ODE is linear, x(sigma) = x_T sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_T^2),
so every sampler's error is its own. On DDPM's linear T=1000 schedule at 10 steps (uniform and quadratic grids),
61 start points evenly spaced over +-3 prior standard deviations, the mean |x - x_exact| at the data of DDIM
(Euler) and of 2M with min_ratio 0 (always second order), 0.25, 0.5 (the default) and 1, and with diffusers' lower_order_final (first order on the last step to a positive level):

    python benchmarks/dpmpp_last_step.py
"""

from __future__ import annotations

from functools import partial

import torch

import samplers
from lightning_modules.ddpm import DDPM
from lightning_modules.nets import MLP

RATIOS = (0.0, 0.25, 0.5, 1.0)


def main() -> None:
    module = DDPM(MLP((1,), hidden=4, depth=1), partial(torch.optim.Adam), data_shape=(1,))
    print("| s | grid | DDIM | " + " | ".join(f"2M min_ratio {r:g}" for r in RATIOS) + " | 2M lower_order_final |")
    print("|---|---|---:|" + "---:|" * (len(RATIOS) + 1))
    for s in (0.1, 0.5, 1.0):
        module.denoise = lambda x, sigma, cond=None, s=s: x * samplers.bcast(s**2 / (s**2 + sigma.double() ** 2), x)
        for spacing in ("uniform", "quadratic"):
            sigmas = module.grid("ddim", 10, {"ddim_spacing": spacing})
            top = float(sigmas[0])
            x_T = torch.linspace(-3, 3, 61, dtype=torch.float64)[:, None] * (s**2 + top**2) ** 0.5
            exact = x_T * s / (s**2 + top**2) ** 0.5
            row = [samplers.SAMPLERS["euler"].fn(module.denoise, x_T, sigmas)]
            row += [samplers.SAMPLERS["dpmpp_2m"].fn(module.denoise, x_T, sigmas, min_ratio=r) for r in RATIOS]
            row.append(samplers.SAMPLERS["dpmpp_2m"].fn(module.denoise, x_T, sigmas, min_ratio=0.0, lower_order_final=True))
            print(f"| {s:g} | {spacing} | " + " | ".join(f"{(x - exact).abs().mean():.3f}" for x in row) + " |")


if __name__ == "__main__":
    main()
