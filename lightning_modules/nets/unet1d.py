"""Diffusion Policy's 1-D temporal convolution UNet (Chi et al. 2023, `ConditionalUnet1D`).

Denoises an action chunk (B, horizon, action_dim): the convolutions run over
time with the action dimensions as channels, and every residual block is
FiLM-modulated by one global vector, the noise-level embedding concatenated
with the flattened observation history. down_dims=(256, 512, 1024) with a
256-wide step embedding is the paper's setting (~65M parameters for PushT's
horizon 16, action_dim 2, two 20-dim observations).
"""

import torch
from torch import Tensor, nn

from lightning_modules.nets.embeddings import Condition, as_batch, sinusoidal_embedding
from lightning_modules.nets.unet import GroupNorm32


class Conv1dBlock(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, n_groups: int):
        # GroupNorm32 keeps the statistics in float32 under bf16 autocast, as in the image UNet.
        super().__init__(
            nn.Conv1d(in_ch, out_ch, kernel_size, padding=kernel_size // 2),
            GroupNorm32(n_groups, out_ch),
            nn.Mish(),
        )


class ConditionalResidualBlock1D(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, cond_vec_dim: int, kernel_size: int, n_groups: int):
        super().__init__()
        self.out_ch = out_ch
        self.block1 = Conv1dBlock(in_ch, out_ch, kernel_size, n_groups)
        # FiLM after the first conv block: the condition rescales and shifts each channel for the
        # whole chunk, which is how the paper injects the observations into every resolution.
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_vec_dim, 2 * out_ch))
        self.block2 = Conv1dBlock(out_ch, out_ch, kernel_size, n_groups)
        self.residual = nn.Conv1d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, cond_vec: Tensor) -> Tensor:
        h = self.block1(x)
        scale, bias = self.film(cond_vec)[:, :, None].chunk(2, dim=1)
        h = self.block2(scale * h + bias)
        return h + self.residual(x)


class ConditionalUnet1D(nn.Module):
    def __init__(
        self,
        data_shape: tuple[int, int],
        cond_dim: int | None = None,
        down_dims: tuple[int, ...] = (64, 128, 256),
        kernel_size: int = 5,
        n_groups: int = 8,
        step_embed_dim: int = 128,
        embedding_scale: float = 1.0,
    ):
        super().__init__()
        if len(data_shape) != 2:
            raise ValueError(f"ConditionalUnet1D needs data_shape (horizon, action_dim), got {tuple(data_shape)}")
        down_dims = [int(d) for d in down_dims]
        if not down_dims:
            raise ValueError("down_dims must name at least one level, e.g. [64, 128, 256]")
        if kernel_size % 2 == 0:
            # An even kernel with padding k//2 lengthens the sequence by one at every conv.
            raise ValueError(f"kernel_size must be odd so convolutions keep the horizon, got {kernel_size}")
        horizon, action_dim = (int(s) for s in data_shape)
        factor = 2 ** (len(down_dims) - 1)
        if horizon % factor:
            raise ValueError(
                f"horizon {horizon} must be divisible by 2**(len(down_dims)-1) = {factor}: down_dims={down_dims} "
                f"halves the time axis {len(down_dims) - 1} times; use a horizon that is a multiple of {factor} "
                f"or fewer down_dims"
            )
        self.data_shape = (horizon, action_dim)
        self.cond_dim = cond_dim
        self.step_embed_dim = step_embed_dim
        self.embedding_scale = embedding_scale

        self.step_encoder = nn.Sequential(
            nn.Linear(step_embed_dim, 4 * step_embed_dim),
            nn.Mish(),
            nn.Linear(4 * step_embed_dim, step_embed_dim),
        )
        # The observations enter raw (no encoder of their own): each block's FiLM layer is their encoder.
        self.condition = Condition(cond_dim, "concat")
        cond_vec_dim = step_embed_dim + (cond_dim or 0)

        def res(i: int, o: int) -> ConditionalResidualBlock1D:
            return ConditionalResidualBlock1D(i, o, cond_vec_dim, kernel_size, n_groups)

        self.down = nn.ModuleList()
        for level, (dim_in, dim_out) in enumerate(zip([action_dim, *down_dims[:-1]], down_dims)):
            last = level == len(down_dims) - 1
            self.down.append(
                nn.ModuleList([
                    res(dim_in, dim_out),
                    res(dim_out, dim_out),
                    nn.Identity() if last else nn.Conv1d(dim_out, dim_out, 3, stride=2, padding=1),
                ])
            )
        self.mid = nn.ModuleList([res(down_dims[-1], down_dims[-1]), res(down_dims[-1], down_dims[-1])])

        # One decoder level per downsampling, coarsest first; each consumes the encoder output of the
        # same resolution. As in the reference implementation the decoder stops at down_dims[0]
        # channels, so the full-resolution encoder output (level 0) is never used as a skip.
        self.up = nn.ModuleList()
        for dim_in, dim_out in reversed(list(zip(down_dims[:-1], down_dims[1:]))):
            self.up.append(
                nn.ModuleList([
                    res(2 * dim_out, dim_in),
                    res(dim_in, dim_in),
                    nn.ConvTranspose1d(dim_in, dim_in, 4, stride=2, padding=1),
                ])
            )

        self.final = nn.Sequential(
            Conv1dBlock(down_dims[0], down_dims[0], kernel_size, n_groups),
            nn.Conv1d(down_dims[0], action_dim, 1),
        )
        # Start as the zero function like the project's other nets (an eps- or score-predictor
        # begins at the prior's mean guess); the paper keeps PyTorch's default init here.
        nn.init.zeros_(self.final[-1].weight)
        nn.init.zeros_(self.final[-1].bias)

    def _cond_vector(self, noise_level: Tensor | float, cond: Tensor | None, batch_size: int, device) -> Tensor:
        noise_level = as_batch(noise_level, batch_size, device)
        dtype = self.step_encoder[0].weight.dtype  # follow the net (float64 for gradient checks)
        emb = self.step_encoder(sinusoidal_embedding(noise_level * self.embedding_scale, self.step_embed_dim).to(dtype))
        return self.condition(emb, cond, dtype)

    def forward(self, x: Tensor, noise_level: Tensor | float, cond: Tensor | None = None) -> Tensor:
        if tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f"x must have shape (B, {self.data_shape[0]}, {self.data_shape[1]}), got {tuple(x.shape)}")
        cond_vec = self._cond_vector(noise_level, cond, x.shape[0], x.device)
        h = x.transpose(1, 2)  # (B, action_dim, horizon): actions are the channels, time the conv axis
        skips = []
        for block1, block2, downsample in self.down:
            h = block2(block1(h, cond_vec), cond_vec)
            skips.append(h)
            h = downsample(h)
        for block in self.mid:
            h = block(h, cond_vec)
        for block1, block2, upsample in self.up:
            h = block2(block1(torch.cat([h, skips.pop()], dim=1), cond_vec), cond_vec)
            h = upsample(h)
        return self.final(h).transpose(1, 2)

