"""Denoiser nets: the `net(x, noise_level, cond=None) -> like x` contract, sizes, and dependencies."""

import pytest
import torch

from lightning_modules.nets import MLP, UNet, sinusoidal_embedding

SMALL_UNET = dict(ch=32, ch_mult=(1, 2), attn_resolutions=(4,))
# ch=16 < num_groups: guards the GroupNorm clamp (one channel per group would erase the time embedding).
TINY_UNET = dict(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,))

# (net class, data_shape, kwargs) for every net the contract applies to.
NETS = [
    (UNet, (1, 8, 8), SMALL_UNET),
    (UNet, (3, 32, 32), TINY_UNET),
    (MLP, (2,), dict(hidden=64, depth=2)),
    (MLP, (16,), dict(hidden=64, depth=2)),
]
IDS = ["unet-1x8x8", "unet-3x32x32", "mlp-2", "mlp-16"]


def randomised(net: torch.nn.Module) -> torch.nn.Module:
    # The zero-initialised output layers make a fresh net the constant 0; perturb every
    # parameter so that "depends on noise_level / cond" is a statement about the wiring.
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("cls,data_shape,kwargs", NETS, ids=IDS)
def test_output_shape_equals_input_shape(cls, data_shape, kwargs):
    net = cls(data_shape, **kwargs)
    x = torch.randn(3, *data_shape)
    for noise_level in (torch.tensor([0.0, 10.0, 999.0]), torch.tensor(5.0), 5.0):
        assert net(x, noise_level).shape == x.shape


def test_cifar10_unet_has_ho_et_al_parameter_count():
    with torch.device("meta"):
        net = UNet((3, 32, 32), ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1)
    n = sum(p.numel() for p in net.parameters())
    assert 35.5e6 <= n <= 35.9e6, n


@pytest.mark.parametrize("cls,data_shape,kwargs", NETS, ids=IDS)
def test_output_depends_on_noise_level(cls, data_shape, kwargs):
    net = randomised(cls(data_shape, **kwargs)).eval()
    x = torch.randn(2, *data_shape)
    with torch.no_grad():
        a, b = net(x, torch.tensor([1.0, 1.0])), net(x, torch.tensor([500.0, 500.0]))
    assert not torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("cls,data_shape,kwargs", NETS[:1] + NETS[2:3], ids=["unet", "mlp"])
def test_output_depends_on_cond(cls, data_shape, kwargs):
    net = randomised(cls(data_shape, cond_dim=5, **kwargs)).eval()
    x, t = torch.randn(2, *data_shape), torch.tensor([3.0, 3.0])
    with torch.no_grad():
        a, b = net(x, t, torch.zeros(2, 5)), net(x, t, torch.ones(2, 5))
    assert not torch.allclose(a, b, atol=1e-4)


def test_unet_rejects_resolution_not_divisible_by_downsampling():
    with pytest.raises(ValueError, match="divisible"):
        UNet((1, 10, 10), ch=32, ch_mult=(1, 2, 2))  # 10 is not divisible by 4


@pytest.mark.parametrize("cls,data_shape,kwargs", NETS[:1] + NETS[2:3], ids=["unet", "mlp"])
def test_cond_must_match_cond_dim(cls, data_shape, kwargs):
    x, t = torch.randn(2, *data_shape), torch.zeros(2)
    with pytest.raises(ValueError, match="cond_dim=5"):
        cls(data_shape, cond_dim=5, **kwargs)(x, t)
    with pytest.raises(ValueError, match="cond_dim=None"):
        cls(data_shape, **kwargs)(x, t, torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        cls(data_shape, cond_dim=5, **kwargs)(x, t, torch.zeros(2, 4))


def test_noise_level_of_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match="noise_level"):
        MLP((2,))(torch.randn(3, 2), torch.zeros(2))


@pytest.mark.parametrize("cls,data_shape,kwargs", NETS[:1] + NETS[2:3], ids=["unet", "mlp"])
def test_gradients_reach_every_parameter(cls, data_shape, kwargs):
    net = randomised(cls(data_shape, cond_dim=3, **kwargs))
    net(torch.randn(4, *data_shape), torch.rand(4) * 1000, torch.randn(4, 3)).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("cls,data_shape,kwargs", NETS[:1] + NETS[2:3], ids=["unet", "mlp"])
def test_batch_items_are_independent(cls, data_shape, kwargs):
    net = randomised(cls(data_shape, cond_dim=3, **kwargs)).eval()
    x, t, c = torch.randn(4, *data_shape), torch.rand(4) * 1000, torch.randn(4, 3)
    x2, t2, c2 = x.clone(), t.clone(), c.clone()
    x2[1:], t2[1:], c2[1:] = torch.randn_like(x2[1:]), torch.rand(3) * 1000, torch.randn(3, 3)
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, c)[0], net(x2, t2, c2)[0], rtol=1e-5, atol=1e-5)


def test_unet_runs_channels_last_under_bf16_autocast():
    net = randomised(UNet((3, 16, 16), ch=32, ch_mult=(1, 2), attn_resolutions=(8,))).eval()
    net = net.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        reference = net(x, 7.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x, 7.0)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert (out.float() - reference).norm() < 0.05 * reference.norm()


def test_sinusoidal_embedding():
    t = torch.tensor([0.0, 1.0, 999.0, 0.37])
    emb = sinusoidal_embedding(t, 64)
    assert emb.shape == (4, 64)
    assert emb.abs().max() <= 1.0
    assert not torch.allclose(emb[1], emb[2]) and not torch.allclose(emb[0], emb[3])
    # Neighbouring step indices must stay distinguishable (the reason it is computed in float32).
    assert (sinusoidal_embedding(torch.tensor([998.0]), 128) - sinusoidal_embedding(torch.tensor([999.0]), 128)).abs().max() > 0.1
    assert sinusoidal_embedding(torch.tensor([1.0, 2.0]), 7).shape == (2, 7)
