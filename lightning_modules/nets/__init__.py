"""Denoiser networks: `net(x, noise_level, cond=None) -> tensor shaped like x`."""

from lightning_modules.nets.embeddings import sinusoidal_embedding
from lightning_modules.nets.mlp import MLP
from lightning_modules.nets.unet import UNet

__all__ = ["MLP", "UNet", "sinusoidal_embedding"]
