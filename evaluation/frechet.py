"""Frechet distance between Gaussian fits of feature sets (the FID pipeline, feature-agnostic).

`FrechetDistance` takes the feature extractor as a callable so the same code
serves the offline digits classifier and, later, Inception for FID.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import torch


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through a temporary sibling then rename, so concurrent readers
    (parallel runs sharing the cache) never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def gaussian_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, in float64."""
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance; negative round-off eigenvalues are clipped."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}), in float64.

    tr((S1 S2)^{1/2}) is taken as the sum of square roots of the eigenvalues of
    sqrt(S1) S2 sqrt(S1): that matrix is symmetric PSD with the same spectrum as
    S1 S2, so this stays real and well defined for singular covariances (fewer
    samples than dimensions), where scipy's sqrtm needs an eps offset and can
    return spurious imaginary parts.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError("mean vectors and covariances must have matching shapes")
    diff = mu1 - mu2
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    dist = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean
    # Round-off can push an exact zero slightly negative.
    return float(max(dist, 0.0))


class FrechetDistance:
    """Frechet distance of samples to a fixed reference set, in the space of `feature_fn`.

    The reference statistics are computed once; with `cache_path` they are stored
    as .npz and later instances load them instead of re-running `feature_fn`
    (which matters when feature_fn is Inception over 50k images).
    """

    def __init__(
        self,
        feature_fn: Callable[[torch.Tensor], torch.Tensor],
        reference: torch.Tensor | None = None,
        cache_path: str | Path | None = None,
        batch_size: int = 512,
    ):
        self.feature_fn = feature_fn
        self.batch_size = batch_size
        self.cache_path = Path(cache_path) if cache_path is not None else None
        if self.cache_path is not None and self.cache_path.exists():
            with np.load(self.cache_path) as data:
                self.mu_ref, self.sigma_ref = data["mu"], data["sigma"]
            return
        if reference is None:
            raise ValueError("reference is required when no cached statistics exist")
        self.mu_ref, self.sigma_ref = gaussian_stats(self.features(reference))
        if self.cache_path is not None:
            self._save(self.cache_path)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """feature_fn over x in batches, flattened to (N, D) float64 on CPU."""
        x = torch.as_tensor(x)
        chunks = [self.feature_fn(x[i : i + self.batch_size]) for i in range(0, len(x), self.batch_size)]
        return torch.cat([c.reshape(len(c), -1).detach().cpu().double() for c in chunks])

    def __call__(self, samples: torch.Tensor) -> float:
        mu, sigma = gaussian_stats(self.features(samples))
        return frechet_distance(mu, sigma, self.mu_ref, self.sigma_ref)

    def _save(self, path: Path) -> None:
        atomic_write(path, lambda f: np.savez(f, mu=self.mu_ref, sigma=self.sigma_ref))
