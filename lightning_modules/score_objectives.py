"""Score-matching objectives as functions of a score function and a batch, each returning a loss per sample.

- dsm: denoising score matching (Vincent 2011), the target is the score of the noise kernel;
- ism: implicit / Hyvarinen score matching, E[tr(grad_x s(x)) + 1/2 ||s(x)||^2] with the exact
  Jacobian trace (one backward pass per dimension, so low-dimensional data only);
- ssm: sliced score matching (Song et al. 2019), the trace replaced by random projections
  v^T (grad_x s) v; the variance-reduced form (SSM-VR) takes 1/2 ||s||^2 exactly.

ism and ssm differentiate s with respect to its input, so they build a graph even where
Lightning runs validation under inference mode.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from difflab.errors import ConfigError

OBJECTIVES = ("dsm", "ism", "ssm")
ISM_MAX_DIM = 64


@contextlib.contextmanager
def input_gradients():
    """Autograd on, even inside Lightning's validation (inference mode / no_grad)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _sum_dims(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).sum(1)


def dsm(
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """1/2 sigma^2 ||s(x + sigma z, sigma) + z / sigma||^2 (Song & Ermon 2019, eq. 5-6 with lambda = sigma^2)."""
    sig = sigma.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    score = score_fn(x + sig * noise, sigma)
    return 0.5 * _sum_dims((sig * score + noise) ** 2)


def ism(score_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """tr(grad_x s(x)) + 1/2 ||s(x)||^2 (Hyvarinen 2005, Theorem 1) with the exact trace."""
    d = x[0].numel()
    if d > ISM_MAX_DIM:
        raise ConfigError(
            f"model.objective=ism takes the exact Jacobian trace with one backward pass per dimension; "
            f"the data have {d} > {ISM_MAX_DIM} dimensions: use model.objective=ssm (sliced score matching) or dsm"
        )
    with input_gradients():
        x = x.detach().clone().requires_grad_(True)
        score = score_fn(x)
        flat = score.flatten(1)
        trace = torch.zeros(x.shape[0], device=x.device, dtype=score.dtype)
        for i in range(d):
            (grad,) = torch.autograd.grad(flat[:, i].sum(), x, create_graph=True)
            trace = trace + grad.flatten(1)[:, i]
        return trace + 0.5 * _sum_dims(score**2)


def ssm(
    score_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, n_projections: int = 1, probe: str = "gaussian",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """SSM-VR (Song et al. 2019, eq. 8): E_v[v^T (grad_x s) v] + 1/2 ||s||^2, v Gaussian or Rademacher (E[v v^T] = I)."""
    if probe not in ("gaussian", "rademacher"):
        raise ValueError(f"ssm probe must be 'gaussian' or 'rademacher', got {probe!r}")
    with input_gradients():
        x = x.detach().clone().requires_grad_(True)
        score = score_fn(x)
        quad = torch.zeros(x.shape[0], device=x.device, dtype=score.dtype)
        for _ in range(n_projections):
            v = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            if probe == "rademacher":
                v = v.sign()
            # grad_x (v . s) = (grad_x s)^T v, so one backward pass gives v^T (grad_x s) v
            (grad,) = torch.autograd.grad(_sum_dims(v * score).sum(), x, create_graph=True)
            quad = quad + _sum_dims(grad * v)
        return quad / n_projections + 0.5 * _sum_dims(score**2)
