"""Denoiser networks: `net(x, noise_level, cond=None) -> tensor shaped like x`."""

from lightning_modules.nets.embeddings import sinusoidal_embedding
from lightning_modules.nets.mlp import MLP
from lightning_modules.nets.transformer1d import TransformerForDiffusion1D
from lightning_modules.nets.unet import UNet
from lightning_modules.nets.unet1d import ConditionalUnet1D

__all__ = ["MLP", "ConditionalUnet1D", "TransformerForDiffusion1D", "UNet", "sinusoidal_embedding"]
