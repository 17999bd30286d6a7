"""The image observation encoder: Diffusion Policy's recipe checked piece by piece (issue 21).

LeRobot's history lists what quietly breaks an image policy: BatchNorm under EMA, no spatial softmax, no crop,
unnormalised images. Each has a test here that a wrong encoder fails.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_modules.nets.obs_encoder import CameraEncoder, ObsEncoder, SpatialSoftmax, check_no_batchnorm, crop


def frames(n, t=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 3, 96, 96) if t is None else (n, t, 3, 96, 96)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("backbone", ["resnet18", "conv"])
def test_output_shape_and_groupnorm_only(backbone):
    enc = ObsEncoder({"image": (3, 96, 96)}, low_dim=2, n_obs_steps=2, backbone=backbone)
    check_no_batchnorm(enc)
    norms = [m for m in enc.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_groups == max(m.num_channels // 16, 1) for m in norms)
    if backbone == "resnet18":  # torchvision's ResNet-18 with GroupNorm: 20 norm layers, 11.2M weights before the head
        assert len(norms) == 20
        assert 11.0e6 < sum(p.numel() for p in enc.cameras["image"].backbone.parameters()) < 11.4e6
    low = torch.randn(4, 2, 2)
    out = enc({"image": frames(4, 2), "low_dim": low})
    assert out.shape == (4, enc.out_dim) and enc.out_dim == 2 * (64 + 2)
    # per step: camera features then the state, flattened over steps (the layout sequence methods reshape)
    torch.testing.assert_close(out.reshape(4, 2, 66)[..., 64:], low)


def test_check_no_batchnorm_catches_one():
    with pytest.raises(ValueError, match="BatchNorm"):
        check_no_batchnorm(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))


def test_crop_random_in_training_centre_in_eval():
    images = frames(6)
    centre = crop(images, 84, random=False)
    torch.testing.assert_close(centre, images[:, :, 6:90, 6:90])
    g = torch.Generator().manual_seed(0)
    random = crop(images, 84, random=True, generator=g)
    assert random.shape == (6, 3, 84, 84)
    # each crop is the image's own window at some offset, and the offsets differ between images
    offsets = []
    for i in range(6):
        found = [(r, c) for r in range(13) for c in range(13) if torch.equal(images[i, :, r : r + 84, c : c + 84], random[i])]
        assert len(found) == 1
        offsets.append(found[0])
    assert len(set(offsets)) > 1
    with pytest.raises(ValueError, match="larger"):
        crop(images, 97, random=False)


def test_camera_encoder_crops_only_in_training():
    torch.manual_seed(0)
    enc = CameraEncoder("conv")
    x = frames(3)
    enc.eval()
    torch.testing.assert_close(enc(x), enc(x))  # centre crop: deterministic
    enc.train()
    torch.manual_seed(1)
    a = enc(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, enc(x))  # a new random crop each call


def test_images_reach_the_backbone_in_minus_one_one():
    enc = CameraEncoder("conv").eval()
    seen = {}
    enc.backbone.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0]))
    enc(torch.full((1, 3, 96, 96), 255, dtype=torch.uint8))
    assert torch.allclose(seen["x"], torch.ones_like(seen["x"]))
    enc(torch.zeros((1, 3, 96, 96), dtype=torch.uint8))
    assert torch.allclose(seen["x"], -torch.ones_like(seen["x"]))
    with pytest.raises(TypeError, match="uint8"):
        enc(torch.zeros((1, 3, 96, 96)))


def test_spatial_softmax_finds_a_hot_spot():
    pool = SpatialSoftmax(1, num_kp=1)
    with torch.no_grad():
        pool.keypoints.weight.fill_(1.0)
        pool.keypoints.bias.zero_()
    for row, col in [(0, 0), (2, 7), (10, 3)]:
        feat = torch.zeros(1, 1, 11, 11)
        feat[0, 0, row, col] = 100.0
        x, y = pool(feat)[0]
        assert x.item() == pytest.approx(-1 + 2 * col / 10, abs=1e-4) and y.item() == pytest.approx(-1 + 2 * row / 10, abs=1e-4)
    flat = pool(torch.zeros(1, 1, 11, 11))[0]  # uniform attention: the centre
    torch.testing.assert_close(flat, torch.zeros(2), atol=1e-6, rtol=0)


def test_obs_encoder_refuses_wrong_inputs():
    enc = ObsEncoder({"image": (3, 96, 96)}, low_dim=2, n_obs_steps=2, backbone="conv")
    with pytest.raises(KeyError, match="lacks"):
        enc({"image": frames(1, 2)})
    with pytest.raises(ValueError, match="3 steps"):
        enc({"image": frames(1, 3), "low_dim": torch.zeros(1, 3, 2)})
    with pytest.raises(ValueError, match="backbone"):
        CameraEncoder("vit")
