"""Residual MLP denoiser for low-dimensional data (2-D toys, flat vectors)."""

import math

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.nets.embeddings import NoiseLevelEmbedding


class MLPBlock(nn.Module):
    """Pre-norm residual block; the embedding is added between the two layers, as in the UNet's ResBlock."""

    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb_proj = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        out = self.fc1(F.silu(self.norm(h))) + self.emb_proj(F.silu(emb))
        return h + self.fc2(self.dropout(F.silu(out)))


class MLP(nn.Module):
    def __init__(
        self,
        data_shape: tuple[int, ...],
        cond_dim: int | None = None,
        hidden: int = 256,
        depth: int = 4,
        emb_dim: int = 128,
        embedding_scale: float = 1.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.data_shape = tuple(data_shape)
        data_dim = math.prod(self.data_shape)
        self.embed = NoiseLevelEmbedding(emb_dim, hidden, cond_dim, embedding_scale)
        self.fc_in = nn.Linear(data_dim, hidden)
        self.blocks = nn.ModuleList(MLPBlock(hidden, dropout) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden)
        self.fc_out = nn.Linear(hidden, data_dim)
        # Start as the zero function: an eps- or score-predictor begins at the prior's mean guess.
        nn.init.zeros_(self.fc_out.weight)
        nn.init.zeros_(self.fc_out.bias)

    def forward(self, x: Tensor, noise_level: Tensor | float, cond: Tensor | None = None) -> Tensor:
        emb = self.embed(noise_level, cond, x.shape[0], x.device)
        h = self.fc_in(x.reshape(x.shape[0], -1))
        for block in self.blocks:
            h = block(h, emb)
        return self.fc_out(F.silu(self.norm_out(h))).reshape(x.shape)
