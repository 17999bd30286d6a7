"""The DDPM image UNet (Ho et al. 2020, Appendix B; their `diffusion_tf/models/unet.py`).

CIFAR-10 setting: ch=128, ch_mult=(1, 2, 2, 2), two ResBlocks per resolution,
self-attention at 16x16, dropout 0.1 -> 35.7M parameters.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.nets.embeddings import NoiseLevelEmbedding


def _init(module: nn.Conv2d | nn.Linear, zero: bool = False) -> nn.Module:
    # Ho et al. use variance_scaling(1, "fan_avg", "uniform") (= Xavier uniform) everywhere and
    # scale ~0 on the last conv of each residual branch and of the net: blocks start as the identity.
    if zero:
        nn.init.zeros_(module.weight)
    else:
        nn.init.xavier_uniform_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32: its variance overflows / loses precision in bf16 and fp16."""

    def __init__(self, num_groups: int, num_channels: int):
        # Clamp to a divisor of the channel count with >= 2 channels per group: with one channel per
        # group the norm subtracts each channel's mean, erasing the per-channel time-embedding bias
        # that ResBlock adds right before norm2 (ch=32: 32 channels -> 16 groups; 96 -> 32).
        groups = math.gcd(min(num_groups, max(num_channels // 2, 1)), num_channels)
        super().__init__(groups, num_channels)

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)  # float64 stays float64
        out = F.group_norm(x.to(dtype), self.num_groups, self.weight.to(dtype), self.bias.to(dtype), self.eps)
        return out.to(x.dtype)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float, num_groups: int):
        super().__init__()
        self.norm1 = GroupNorm32(num_groups, in_ch)
        self.conv1 = _init(nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.temb_proj = _init(nn.Linear(temb_dim, out_ch))
        self.norm2 = GroupNorm32(num_groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _init(nn.Conv2d(out_ch, out_ch, 3, padding=1), zero=True)
        self.skip = _init(nn.Conv2d(in_ch, out_ch, 1)) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, residual."""

    def __init__(self, ch: int, num_groups: int):
        super().__init__()
        self.norm = GroupNorm32(num_groups, ch)
        self.qkv = _init(nn.Conv2d(ch, 3 * ch, 1))
        self.proj_out = _init(nn.Conv2d(ch, ch, 1), zero=True)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2)  # (B, 3, HW, C)
        q, k, v = qkv.unbind(1)
        # The fused kernel keeps the softmax in float32 under autocast; scale is 1/sqrt(C) as in Ho et al.
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, ch: int, with_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1) if with_conv else nn.AvgPool2d(2)
        if with_conv:
            _init(self.op)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int, with_conv: bool):
        super().__init__()
        self.conv = _init(nn.Conv2d(ch, ch, 3, padding=1)) if with_conv else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TembSequential(nn.Sequential):
    """A Sequential that hands the embedding to the ResBlocks in it."""

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        for layer in self:
            x = layer(x, temb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNet(nn.Module):
    def __init__(
        self,
        data_shape: tuple[int, int, int],
        cond_dim: int | None = None,
        ch: int = 128,
        ch_mult: tuple[int, ...] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.1,
        resamp_with_conv: bool = True,
        num_groups: int = 32,
        embedding_scale: float = 1.0,
    ):
        super().__init__()
        if len(data_shape) != 3:
            raise ValueError(f"UNet needs data_shape (C, H, W), got {tuple(data_shape)}")
        in_ch, height, width = data_shape
        factor = 2 ** (len(ch_mult) - 1)
        if height % factor or width % factor:
            raise ValueError(
                f"image size {height}x{width} must be divisible by 2**(len(ch_mult)-1) = {factor}: "
                f"ch_mult={tuple(ch_mult)} halves the resolution {len(ch_mult) - 1} times"
            )
        self.data_shape = tuple(data_shape)
        temb_dim = 4 * ch
        self.embed = NoiseLevelEmbedding(ch, temb_dim, cond_dim, embedding_scale)
        for linear in self.embed.modules():  # the time MLP's, then the condition MLP's
            if isinstance(linear, nn.Linear):
                _init(linear)

        def res(i, o):
            return ResBlock(i, o, temb_dim, dropout, num_groups)

        self.conv_in = _init(nn.Conv2d(in_ch, ch, 3, padding=1))
        # Encoder: every block's output is kept for a skip connection into the decoder.
        self.down = nn.ModuleList()
        skip_chs, cur_ch, res_now = [ch], ch, height
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                block = [res(cur_ch, ch * mult)]
                cur_ch = ch * mult
                if res_now in attn_resolutions:
                    block.append(AttnBlock(cur_ch, num_groups))
                self.down.append(TembSequential(*block))
                skip_chs.append(cur_ch)
            if level != len(ch_mult) - 1:
                self.down.append(TembSequential(Downsample(cur_ch, resamp_with_conv)))
                skip_chs.append(cur_ch)
                res_now //= 2

        self.mid = TembSequential(res(cur_ch, cur_ch), AttnBlock(cur_ch, num_groups), res(cur_ch, cur_ch))

        # Decoder: one more ResBlock per level than the encoder, so every skip is consumed.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for i in range(num_res_blocks + 1):
                block = [res(cur_ch + skip_chs.pop(), ch * mult)]
                cur_ch = ch * mult
                if res_now in attn_resolutions:
                    block.append(AttnBlock(cur_ch, num_groups))
                if level != 0 and i == num_res_blocks:
                    block.append(Upsample(cur_ch, resamp_with_conv))
                    res_now *= 2
                self.up.append(TembSequential(*block))

        self.norm_out = GroupNorm32(num_groups, cur_ch)
        self.conv_out = _init(nn.Conv2d(cur_ch, in_ch, 3, padding=1), zero=True)

    def forward(self, x: Tensor, noise_level: Tensor | float, cond: Tensor | None = None) -> Tensor:
        temb = self.embed(noise_level, cond, x.shape[0], x.device)
        hs = [self.conv_in(x)]
        for block in self.down:
            hs.append(block(hs[-1], temb))
        h = self.mid(hs[-1], temb)
        for block in self.up:
            h = block(torch.cat([h, hs.pop()], dim=1), temb)
        return self.conv_out(F.silu(self.norm_out(h)))
