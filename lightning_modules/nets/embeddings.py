"""Noise-level and condition embeddings shared by every denoiser net."""

import math

import torch
from torch import Tensor, nn


def sinusoidal_embedding(noise_level: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer / DDPM sinusoidal embedding of a float per batch item: (B,) -> (B, dim).

    Frequencies run geometrically from 1 to 1/max_period (Ho et al. 2020,
    `get_timestep_embedding`), so step indices 0..999 and continuous values
    (sigma, t * 1000, EDM's c_noise) are both resolved.
    """
    half = dim // 2
    # Computed in float32 even under autocast: bf16 cannot tell step 998 from 999.
    exponents = torch.arange(half, device=noise_level.device, dtype=torch.float32) / max(half - 1, 1)
    freqs = torch.exp(-math.log(max_period) * exponents)
    args = noise_level.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


def as_batch(noise_level: Tensor | float, batch_size: int, device: torch.device) -> Tensor:
    """Accept a (B,) tensor, a 0-dim tensor or a Python number; return float32 (B,)."""
    noise_level = torch.as_tensor(noise_level, device=device, dtype=torch.float32)
    if noise_level.ndim == 0:
        noise_level = noise_level.expand(batch_size)
    if noise_level.shape != (batch_size,):
        raise ValueError(
            f"noise_level must have shape ({batch_size},) or be a scalar, got {tuple(noise_level.shape)}"
        )
    return noise_level


class NoiseLevelEmbedding(nn.Module):
    """sinusoidal(noise_level * scale) -> Linear -> SiLU -> Linear, plus an optional condition.

    The condition goes through its own two-layer MLP and is added, so the nets
    see one vector per sample that carries both "how noisy" and "given what".
    """

    def __init__(self, sin_dim: int, out_dim: int, cond_dim: int | None = None, embedding_scale: float = 1.0):
        super().__init__()
        self.sin_dim = sin_dim
        self.cond_dim = cond_dim
        self.embedding_scale = embedding_scale
        self.time_mlp = nn.Sequential(nn.Linear(sin_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))
        self.cond_mlp = (
            None
            if cond_dim is None
            else nn.Sequential(nn.Linear(cond_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))
        )

    def forward(self, noise_level: Tensor | float, cond: Tensor | None, batch_size: int, device) -> Tensor:
        noise_level = as_batch(noise_level, batch_size, device)
        dtype = self.time_mlp[0].weight.dtype  # follow the net (float64 for gradient checks)
        emb = self.time_mlp(sinusoidal_embedding(noise_level * self.embedding_scale, self.sin_dim).to(dtype))
        if self.cond_mlp is None:
            if cond is not None:
                raise ValueError("got a cond tensor, but the net was built with cond_dim=None")
            return emb
        if cond is None:
            raise ValueError(f"the net was built with cond_dim={self.cond_dim}, so cond (B, {self.cond_dim}) is required")
        # An observation history (B, T, D) counts as one flat vector of T * D.
        cond = cond.reshape(cond.shape[0], -1)
        if cond.shape != (batch_size, self.cond_dim):
            raise ValueError(f"cond must have shape ({batch_size}, {self.cond_dim}), got {tuple(cond.shape)}")
        return emb + self.cond_mlp(cond.to(dtype))
