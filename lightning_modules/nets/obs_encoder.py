"""Observation encoders: camera images (uint8) and low-dim state in, the flat per-step `cond` every method reads.

Diffusion Policy's visuomotor recipe (Chi et al. 2023, after robomimic): one ResNet-18 per camera with no
pretrained weights, every BatchNorm replaced by GroupNorm (channels // 16 groups: BatchNorm's running statistics
and the EMA copy of the weights disagree, which quietly breaks the EMA policy), spatial-softmax pooling to 32
keypoints, a linear layer to 64 features; a random crop (84 of 96) in training and the centre crop at evaluation.
Images stay uint8 until here, so the loader moves bytes and the normalisation and augmentation run per batch on
the model's device.

Output layout: for each observation step t the camera features (cameras in key order) and then the low-dim
vector, flattened over t: (B, n_obs_steps * (n_cameras * feature_dim + low_dim)). Sequence methods (LSTM-GMM,
BET) reshape it to (B, T, per_step) exactly as they do a state history.
"""

from __future__ import annotations

import torch
from torch import nn

from difflab.errors import ConfigError


class SpatialSoftmax(nn.Module):
    """Expected image position of each of num_kp learned keypoint maps (Levine et al. 2016): (B, C, H, W) ->
    (B, 2 * num_kp), x then y in [-1, 1] per keypoint. It keeps *where* features are, which average pooling
    throws away and which a pushing policy needs."""

    def __init__(self, in_channels: int, num_kp: int = 32):
        super().__init__()
        self.keypoints = nn.Conv2d(in_channels, num_kp, kernel_size=1)
        self.num_kp = num_kp

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        maps = self.keypoints(features)
        b, k, h, w = maps.shape
        attention = torch.softmax(maps.reshape(b, k, h * w), dim=-1).reshape(b, k, h, w)
        ys = torch.linspace(-1.0, 1.0, h, device=maps.device, dtype=maps.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=maps.device, dtype=maps.dtype)
        x = (attention.sum(dim=2) * xs).sum(dim=-1)
        y = (attention.sum(dim=3) * ys).sum(dim=-1)
        return torch.stack([x, y], dim=-1).reshape(b, 2 * k)


def group_norm(channels: int) -> nn.GroupNorm:
    """Diffusion Policy's replacement for BatchNorm: channels // 16 groups (at least one)."""
    return nn.GroupNorm(max(channels // 16, 1), channels)


def resnet18_backbone() -> tuple[nn.Module, int]:
    """torchvision's ResNet-18, no pretrained weights, GroupNorm throughout, without its pooling and head."""
    from torchvision.models import resnet18

    net = resnet18(weights=None, norm_layer=group_norm)
    return nn.Sequential(*list(net.children())[:-2]), 512


def conv_backbone(channels: tuple[int, ...] = (32, 64, 128)) -> tuple[nn.Module, int]:
    """A CPU-sized stand-in: stride-2 3x3 convolutions with GroupNorm and ReLU (84 px -> 11 px at three layers)."""
    layers, c_in = [], 3
    for i, c in enumerate(channels):
        layers += [nn.Conv2d(c_in, c, kernel_size=5 if i == 0 else 3, stride=2, padding=2 if i == 0 else 1), group_norm(c), nn.ReLU()]
        c_in = c
    return nn.Sequential(*layers), c_in


def crop(images: torch.Tensor, size: int, random: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, size, size): an independent random window per image, or the centre one."""
    n, _, h, w = images.shape
    if size > min(h, w):
        raise ValueError(f"crop {size} is larger than the {h}x{w} images: lower obs_encoder.crop")
    if not random:
        top, left = (h - size) // 2, (w - size) // 2
        return images[:, :, top : top + size, left : left + size]
    top = torch.randint(0, h - size + 1, (n,), generator=generator, device=images.device)
    left = torch.randint(0, w - size + 1, (n,), generator=generator, device=images.device)
    offsets = torch.arange(size, device=images.device)
    rows = (top[:, None] + offsets)[:, None, :, None]  # (N, 1, size, 1)
    cols = (left[:, None] + offsets)[:, None, None, :]  # (N, 1, 1, size)
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return images[batch, channel, rows, cols]


class CameraEncoder(nn.Module):
    """One camera: uint8 (N, 3, H, W) -> (N, feature_dim)."""

    def __init__(self, backbone: str = "resnet18", crop_size: int = 84, num_kp: int = 32, feature_dim: int = 64,
                 channels: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        if backbone == "resnet18":
            self.backbone, width = resnet18_backbone()
        elif backbone == "conv":
            self.backbone, width = conv_backbone(tuple(int(c) for c in channels))
        else:
            raise ConfigError(f"obs_encoder.backbone={backbone!r}: use resnet18 (Diffusion Policy's) or conv (CPU-sized)")
        self.crop_size = int(crop_size)
        self.pool = SpatialSoftmax(width, num_kp)
        self.project = nn.Linear(2 * num_kp, feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"camera images must reach the encoder as uint8 (0..255), got {images.dtype}")
        x = crop(images, self.crop_size, random=self.training).float() * (2.0 / 255.0) - 1.0  # [-1, 1]
        return self.project(self.pool(self.backbone(x)))


class ObsEncoder(nn.Module):
    """The observation history -> cond. `image_shapes` {key: (C, H, W)} gets one CameraEncoder each; `low_dim` is
    the per-step size of the (already normalised) state keys, passed through under the key 'low_dim'."""

    def __init__(self, image_shapes: dict, low_dim: int, n_obs_steps: int, backbone: str = "resnet18", crop: int = 84,
                 num_kp: int = 32, feature_dim: int = 64, channels: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        if not image_shapes:
            raise ValueError("ObsEncoder needs at least one image key; state-only data needs no obs_encoder")
        self.image_keys = sorted(image_shapes)
        self.image_shapes = {k: tuple(int(d) for d in image_shapes[k]) for k in self.image_keys}
        self.low_dim, self.n_obs_steps, self.feature_dim = int(low_dim), int(n_obs_steps), int(feature_dim)
        self.cameras = nn.ModuleDict({k: CameraEncoder(backbone, crop, num_kp, feature_dim, channels) for k in self.image_keys})
        self.per_step = len(self.image_keys) * self.feature_dim + self.low_dim
        self.out_dim = self.n_obs_steps * self.per_step

    def forward(self, obs: dict) -> torch.Tensor:
        missing = [k for k in (*self.image_keys, *(["low_dim"] if self.low_dim else [])) if k not in obs]
        if missing:
            raise KeyError(f"observation lacks {missing}; the encoder reads {self.image_keys} and low_dim ({self.low_dim} per step)")
        first = obs[self.image_keys[0]]
        b, t = first.shape[:2]
        if t != self.n_obs_steps:
            raise ValueError(f"observation history has {t} steps, the encoder was built for {self.n_obs_steps}")
        parts = []
        for key in self.image_keys:
            images = obs[key]
            if tuple(images.shape[2:]) != self.image_shapes[key]:
                raise ValueError(f"{key} images are {tuple(images.shape[2:])}, the encoder was built for {self.image_shapes[key]}")
            parts.append(self.cameras[key](images.reshape(b * t, *images.shape[2:])).reshape(b, t, self.feature_dim))
        if self.low_dim:
            parts.append(obs["low_dim"].reshape(b, t, self.low_dim).to(parts[0].dtype))
        return torch.cat(parts, dim=-1).reshape(b, self.out_dim)


def check_no_batchnorm(module: nn.Module) -> None:
    """GroupNorm only: a BatchNorm left anywhere would make the EMA policy's statistics disagree with its weights."""
    bad = [name for name, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bad:
        raise ValueError(f"BatchNorm layers in the observation encoder: {bad[:3]}")

