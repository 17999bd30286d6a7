"""Distributions whose score is known in closed form at every noise level.

A Gaussian mixture perturbed by y = scale * x + sigma * z is again a Gaussian
mixture, so its score is exact for DDPM/VP (scale = sqrt(abar), sigma =
sqrt(1 - abar)) and VE/SMLD (scale = 1). Tests and notebooks plug these in
where a trained net would go, so samplers can be checked against the truth.
"""

from __future__ import annotations

import math

import torch


class GaussianMixture:
    """sum_k w_k N(mu_k, s_k^2 I) in D dimensions with isotropic components."""

    def __init__(self, means, stds, weights=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64).reshape(-1)
        k = self.means.shape[0]
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()
        if self.stds.numel() == 1:
            self.stds = self.stds.expand(k).clone()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def mean(self) -> torch.Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    def sample(self, n: int, generator: torch.Generator | None = None, return_labels: bool = False):
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        x = self.means[labels] + self.stds[labels, None] * z
        return (x.float(), labels) if return_labels else x.float()

    def _components(self, y: torch.Tensor, scale, sigma):
        """Per-component means (B?, K, D), variances (B?, K) of the perturbed mixture and log responsibilities."""
        y = y.to(torch.float64)
        scale = torch.as_tensor(scale, dtype=torch.float64).reshape(-1, 1, 1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
        means = scale * self.means[None]  # (B or 1, K, D)
        var = scale[..., 0] ** 2 * self.stds[None] ** 2 + sigma**2  # (B or 1, K)
        diff = y[:, None, :] - means  # (B, K, D)
        log_norm = -0.5 * (diff**2).sum(-1) / var - 0.5 * self.dim * torch.log(2 * math.pi * var)
        log_joint = torch.log(self.weights)[None] + log_norm
        return diff, var, log_joint

    def log_prob(self, y: torch.Tensor, scale=1.0, sigma=0.0) -> torch.Tensor:
        _, _, log_joint = self._components(y, scale, sigma)
        return torch.logsumexp(log_joint, dim=1)

    def score(self, y: torch.Tensor, scale=1.0, sigma=0.0) -> torch.Tensor:
        """grad_y log p(y) where y = scale * x + sigma * z; scale and sigma are scalars or (B,) tensors."""
        diff, var, log_joint = self._components(y, scale, sigma)
        resp = torch.softmax(log_joint, dim=1)  # (B, K)
        score = -(resp[..., None] * diff / var[..., None]).sum(1)
        return score.to(y.dtype)

    def denoiser(self, y: torch.Tensor, scale=1.0, sigma=0.0) -> torch.Tensor:
        """E[x | y] by Tweedie's formula: (y + sigma^2 score(y)) / scale."""
        scale_t = torch.as_tensor(scale, dtype=y.dtype).reshape(-1, *([1] * (y.dim() - 1)))
        sigma_t = torch.as_tensor(sigma, dtype=y.dtype).reshape(-1, *([1] * (y.dim() - 1)))
        return (y + sigma_t**2 * self.score(y, scale, sigma)) / scale_t


class ExactEpsNet(torch.nn.Module):
    """The exact DDPM eps of a Gaussian mixture in a net's slot: eps*(x_t, t) = -sqrt(1 - abar_t) score_t(x_t).

    A DDPM built with it samples (and rolls back) exactly, up to the sampler's own
    discretisation, so tests can tell a sampler's error from a net's. `calls`
    records the grad mode of every call (which forwards could carry gradient).
    """

    def __init__(self, mixture: GaussianMixture, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.mixture = mixture
        self.abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.calls: list[bool] = []

    def forward(self, x, noise_level, cond=None):
        self.calls.append(torch.is_grad_enabled())
        abar = self.abar[noise_level.long()]
        return -(1 - abar).sqrt()[:, None].float() * self.mixture.score(x, abar.sqrt(), (1 - abar).sqrt())
