"""What every sampler shares: the denoiser contract, per-sample sigmas, fresh noise and an NFE counter.

A denoiser is any callable D(x, sigma) -> E[x0 | x] for x = x0 + sigma n, with sigma a (B,) tensor in x's
dtype and device. Methods build theirs (conditioning closed over); tests pass an exact mixture's.
"""

from __future__ import annotations

from typing import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# callback(i, sigma, x): step counter, the (B,) levels x is about to be denoised at, the state itself
Callback = Callable[[int, torch.Tensor, torch.Tensor], None]


def batch_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma as a (B,) tensor in x's dtype and device (a scalar is broadcast to every row)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or have shape ({x.shape[0]},), got {tuple(sigma.shape)}")
    return sigma


def bcast(v, x: torch.Tensor) -> torch.Tensor:
    """A (B,) tensor (or a scalar) shaped to scale a batch of x."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    return v.reshape(-1, *([1] * (x.dim() - 1))) if v.ndim else v


def noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


class Counted:
    """A denoiser that counts the net evaluations per sample it made: the NFE a sampler really spent, returned with
    the samples. `cost()`, when given, is how many net evaluations the call just made (guidance's conditional and
    null passes are two)."""

    def __init__(self, denoiser: Denoiser, cost: Callable[[], int] | None = None):
        self.denoiser, self.calls, self.cost = denoiser, 0, cost

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, *levels) -> torch.Tensor:
        out = self.denoiser(x, sigma, *levels)  # a flow map also takes the level it jumps to
        self.calls += 1 if self.cost is None else self.cost()
        return out


class Watch:
    """Calls the user's callback, if any, with per-sample sigmas."""

    def __init__(self, callback: Callback | None):
        self.callback = callback

    def __call__(self, i: int, sigma: torch.Tensor, x: torch.Tensor) -> None:
        if self.callback is not None:
            self.callback(i, sigma, x)


def clipped(denoiser: Denoiser, low: float = -1.0, high: float = 1.0) -> Denoiser:
    """D clamped to the data range: for a DDPM, the x0 clip with eps recomputed to match (the VE step uses D only)."""
    return lambda x, sigma: denoiser(x, sigma).clamp(low, high)
