"""Per-dimension min/max scaling to [-1, 1], fit on the training episodes and stored in every checkpoint."""

from __future__ import annotations

import numpy as np
import torch

RANGE_EPS = 1e-4  # a dimension that barely varies is only centred: dividing by ~0 would blow it up


class MinMaxNormalizer:
    def __init__(self, low: np.ndarray | torch.Tensor, high: np.ndarray | torch.Tensor):
        self.low = torch.as_tensor(np.asarray(low, dtype=np.float32))
        self.high = torch.as_tensor(np.asarray(high, dtype=np.float32))
        if self.low.shape != self.high.shape:
            raise ValueError(f"low {tuple(self.low.shape)} and high {tuple(self.high.shape)} differ in shape")
        span = self.high - self.low
        flat = span < RANGE_EPS
        self.scale = torch.where(flat, torch.ones_like(span), 2.0 / span.clamp_min(RANGE_EPS))
        self.center = (self.high + self.low) / 2

    @classmethod
    def fit(cls, x: np.ndarray) -> "MinMaxNormalizer":
        x = np.asarray(x).reshape(-1, np.asarray(x).shape[-1])
        return cls(x.min(axis=0), x.max(axis=0))

    @property
    def dim(self) -> int:
        return int(self.low.shape[0])

    def normalize(self, x):
        return self._apply(x, lambda t, c, s: (t - c) * s)

    def unnormalize(self, x):
        return self._apply(x, lambda t, c, s: t / s + c)

    def _apply(self, x, fn):
        is_numpy = isinstance(x, np.ndarray)
        t = torch.as_tensor(x, dtype=torch.float32) if is_numpy else x
        if t.shape[-1] != self.dim:
            raise ValueError(f"last dimension is {t.shape[-1]}, the normalizer was fit on {self.dim}")
        out = fn(t, self.center.to(t.device, t.dtype), self.scale.to(t.device, t.dtype))
        return out.numpy() if is_numpy else out

    def state_dict(self) -> dict:
        return {"low": self.low.clone(), "high": self.high.clone()}

    @classmethod
    def from_state_dict(cls, state: dict) -> "MinMaxNormalizer":
        return cls(state["low"], state["high"])
