"""Classifier-free guidance as a denoiser wrapper (Ho & Salimans 2022), so it reaches every sampler of every
denoiser method: D_w(x; sigma) = D(x; sigma, null) + w (D(x; sigma, c) - D(x; sigma, null)).

Autoguidance (Karras et al. 2024) is the same wrapper with another model in the null pass's place: a weaker
denoiser of the same data (smaller, or trained shorter), given the same condition (or none, for an unconditional
pair): D_w = D_guide(x; sigma, c) + w (D(x; sigma, c) - D_guide(x; sigma, c)). The two are different nets, so
their passes are two calls.

w = 1 is the conditional denoiser itself (one evaluation), w = 0 the unconditional one; otherwise the conditional
and the null pass go through the net as one batch of 2B, and count as two evaluations per sample (`cost`, read
by `Counted`). `interval=(lo, hi)` guides only while lo <= sigma <= hi (Kynkaenniemi et al. 2024: guidance at
the highest levels costs diversity, at the lowest it does little) and is the conditional denoiser elsewhere.

`rescale=phi` (CFG-rescale, Lin et al. 2024, Algorithm 2) pulls each guided x0 estimate's std (over a sample's
elements) back toward the conditional estimate's: D_w * (phi std(D_c) / std(D_w) + 1 - phi). It counters the
over-saturation of large w; 0 (the default) is plain guidance. It acts on the x0 estimate, as the paper's
algorithm does (diffusers applies the same formula to eps, which is not the same map).

Note what the guided ODE samples: for w != 1 not the tilted law p(x|c)^w p(x)^(1-w) (whose score the guided
score is only at sigma = 0), but the end of the guided flow, which tests/test_guidance.py computes exactly for a
Gaussian class inside a Gaussian marginal.
"""

from __future__ import annotations

from typing import Callable

import torch

# denoise(x, sigma, cond) -> E[x0 | x, cond]; the guided denoiser is a plain Denoiser of (x, sigma)
CondDenoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Guided:
    def __init__(self, denoise: CondDenoiser, cond: torch.Tensor | None, null: torch.Tensor | None, scale: float,
                 interval: tuple[float, float] | None = None, guide: CondDenoiser | None = None, rescale: float = 0.0):
        self.denoise, self.cond, self.null, self.scale, self.guide = denoise, cond, null, float(scale), guide
        self.rescale = float(rescale)
        self.interval = None if interval is None else (float(interval[0]), float(interval[1]))
        self.cost = 1  # net evaluations per sample of the last call

    def guiding(self, sigma: torch.Tensor) -> bool:
        if self.scale == 1.0:
            return False
        if self.interval is None:
            return True
        level = float(sigma.reshape(-1)[0])  # samplers step every sample at one level
        return self.interval[0] <= level <= self.interval[1]

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if not self.guiding(sigma):
            self.cost = 1
            return self.denoise(x, sigma, self.cond)
        if self.guide is not None:
            self.cost = 2
            if self.scale == 0.0:
                return self.guide(x, sigma, self.cond)
            conditional, weak = self.denoise(x, sigma, self.cond), self.guide(x, sigma, self.cond)
            return self.rescaled(weak + self.scale * (conditional - weak), conditional)
        if self.scale == 0.0:
            self.cost = 1
            return self.denoise(x, sigma, self.null)
        self.cost = 2
        both = self.denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([self.cond, self.null]))
        conditional, unconditional = both.chunk(2)
        return self.rescaled(unconditional + self.scale * (conditional - unconditional), conditional)

    def rescaled(self, guided: torch.Tensor, conditional: torch.Tensor) -> torch.Tensor:
        if self.rescale == 0.0:
            return guided
        dims = tuple(range(1, guided.dim()))
        factor = conditional.std(dims, keepdim=True) / guided.std(dims, keepdim=True)
        return guided * (self.rescale * factor + (1.0 - self.rescale))
