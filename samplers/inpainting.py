"""Soft-masked inpainting guidance as a denoiser wrapper (real-time chunking, Black et al. 2025).

The target Y (the previous action chunk's unexecuted tail, placed at the steps both chunks plan) pulls the new
chunk's x0 estimate through the denoiser's Jacobian, Pi-GDM style:

    D'(x; sigma) = D + sigma min(beta, (1 + sigma^2) / sigma) J_D(x)^T (W * (Y - D)),   J_D = dD/dx,

which on the linear flow path (tau = 1 - t, sigma = t / (1 - t)) is the paper's velocity correction
min(beta, (1 - tau) / (tau r_tau^2)) (Y - A^)^T diag(W) dA^/dA_tau, written once in the VE form so it reaches every
sampler of every denoiser method. W is the soft mask (`rtc_weights`): 1 on the steps that will execute while the
chunk is computed, decaying exponentially over the rest of the overlap, 0 beyond. One vector-Jacobian product per
call: the net runs forward and backward, so each call costs about as much as two.
"""

from __future__ import annotations

import math

import torch

from samplers.core import bcast


def rtc_weights(length: int, delay: int, overlap: int) -> torch.Tensor:
    """The soft mask over a chunk's `length` steps: 1 for i < delay; c (e^c - 1) / (e - 1) with c = (overlap - i) /
    (overlap - delay + 1) for delay <= i < overlap; 0 from the end of the overlap on."""
    w = torch.zeros(length, dtype=torch.float64)
    for i in range(min(length, overlap)):
        if i < delay:
            w[i] = 1.0
        else:
            c = (overlap - i) / (overlap - delay + 1)
            w[i] = c * (math.exp(c) - 1) / (math.e - 1)
    return w


class Inpainted:
    def __init__(self, denoise, target: torch.Tensor, weights: torch.Tensor, max_guidance: float = 5.0):
        self.denoise, self.target, self.weights, self.max_guidance = denoise, target, weights, float(max_guidance)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            d = self.denoise(x_in, sigma)
            residual = (self.weights.to(d) * (self.target.to(d) - d)).detach()
            (pull,) = torch.autograd.grad(d, x_in, grad_outputs=residual)
        s = sigma.to(x.dtype)
        scale = torch.where(s > 0, s * torch.minimum(torch.full_like(s, self.max_guidance), (1 + s**2) / s.clamp_min(1e-12)),
                            torch.zeros_like(s))
        return d.detach() + bcast(scale, x) * pull
