"""ConditionalUnet1D (Diffusion Policy's temporal UNet): the net contract on action chunks, its sizes, and its errors."""

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import CONFIG_DIR
from lightning_modules.nets.unet1d import ConditionalUnet1D

HORIZON, ACTION_DIM, COND_DIM = 16, 2, 40  # PushT: 16-step chunks of 2-D actions, two 20-dim observations
SHAPE = (HORIZON, ACTION_DIM)
# Three levels (two skips, two resamplings) at a size that trains in about a second on one thread.
TINY = dict(down_dims=(16, 32, 64), step_embed_dim=32)


def randomised(net: torch.nn.Module) -> torch.nn.Module:
    # The zero-initialised output conv makes a fresh net the constant 0; perturb every
    # parameter so that "depends on noise_level / cond" is a statement about the wiring.
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def from_config(name: str, **kwargs) -> ConditionalUnet1D:
    return instantiate(OmegaConf.load(CONFIG_DIR / "net" / f"{name}.yaml"), **kwargs)


@pytest.mark.parametrize("name,low,high", [("unet1d_small", 4e6, 6e6), ("unet1d_paper", 60e6, 70e6)])
def test_config_parameter_counts(name, low, high):
    with torch.device("meta"):
        net = from_config(name, data_shape=SHAPE, cond_dim=COND_DIM)
    assert isinstance(net, ConditionalUnet1D)
    n = sum(p.numel() for p in net.parameters())
    assert low <= n <= high, n


def test_fresh_net_is_the_zero_function():
    net = ConditionalUnet1D(SHAPE, COND_DIM, **TINY)
    assert net(torch.randn(3, *SHAPE), 5.0, torch.randn(3, COND_DIM)).abs().max() == 0


def test_small_config_keeps_the_shape_and_reads_a_history_as_a_flat_vector():
    net = randomised(from_config("unet1d_small", data_shape=SHAPE, cond_dim=COND_DIM)).eval()
    x, t, cond = torch.randn(3, *SHAPE), torch.tensor([0.0, 10.0, 999.0]), torch.randn(3, COND_DIM)
    with torch.no_grad():
        flat = net(x, t, cond)
        history = net(x, t, cond.reshape(3, 2, 20))
    assert flat.shape == history.shape == x.shape
    torch.testing.assert_close(flat, history)


def test_scalar_and_batched_noise_levels_agree():
    net = randomised(ConditionalUnet1D(SHAPE, COND_DIM, **TINY)).eval()
    x, cond = torch.randn(3, *SHAPE), torch.randn(3, COND_DIM)
    with torch.no_grad():
        batched = net(x, torch.full((3,), 7.0), cond)
        for scalar in (7.0, torch.tensor(7.0)):
            torch.testing.assert_close(net(x, scalar, cond), batched)


def test_output_depends_on_cond_noise_level_and_embedding_scale():
    net = randomised(ConditionalUnet1D(SHAPE, COND_DIM, **TINY)).eval()
    x, t, cond = torch.randn(2, *SHAPE), torch.tensor([3.0, 3.0]), torch.randn(2, COND_DIM)
    with torch.no_grad():
        reference = net(x, t, cond)
        assert not torch.allclose(reference, net(x, t, cond + 1.0), atol=1e-4)
        assert not torch.allclose(reference, net(x, t * 100, cond), atol=1e-4)
        scaled = ConditionalUnet1D(SHAPE, COND_DIM, embedding_scale=100.0, **TINY)
        scaled.load_state_dict(net.state_dict())
        torch.testing.assert_close(scaled.eval()(x, t, cond), net(x, t * 100, cond))


def test_gradients_reach_every_parameter():
    net = randomised(ConditionalUnet1D(SHAPE, COND_DIM, **TINY))
    net(torch.randn(4, *SHAPE), torch.rand(4) * 1000, torch.randn(4, COND_DIM)).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_batch_items_are_independent():
    # GroupNorm normalises per sample: nothing may leak across the batch.
    net = randomised(ConditionalUnet1D(SHAPE, COND_DIM, **TINY)).eval()
    x, t, c = torch.randn(4, *SHAPE), torch.rand(4) * 1000, torch.randn(4, COND_DIM)
    x2, t2, c2 = x.clone(), t.clone(), c.clone()
    x2[1:], t2[1:], c2[1:] = torch.randn_like(x2[1:]), torch.rand(3) * 1000, torch.randn(3, COND_DIM)
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, c)[0], net(x2, t2, c2)[0], rtol=1e-5, atol=1e-5)


def test_cond_errors_name_what_was_expected():
    x, t = torch.randn(2, *SHAPE), torch.zeros(2)
    with pytest.raises(ValueError, match=f"cond_dim={COND_DIM}"):
        ConditionalUnet1D(SHAPE, COND_DIM, **TINY)(x, t)
    with pytest.raises(ValueError, match="cond_dim=None"):
        ConditionalUnet1D(SHAPE, **TINY)(x, t, torch.zeros(2, COND_DIM))
    net = ConditionalUnet1D(SHAPE, COND_DIM, **TINY)
    with pytest.raises(ValueError, match=r"\(2, 40\), got \(2, 39\)"):
        net(x, t, torch.zeros(2, 39))
    with pytest.raises(ValueError, match=r"got \(2, 3, 20\) \(flattened: \(2, 60\)\)"):
        net(x, t, torch.zeros(2, 3, 20))
    with pytest.raises(ValueError, match=r"\(2, 40\)"):
        net(x, t, torch.zeros(3, COND_DIM))


def test_shape_errors():
    with pytest.raises(ValueError, match="divisible.*multiple of 4"):
        ConditionalUnet1D((10, ACTION_DIM), **TINY)  # three levels halve the horizon twice
    ConditionalUnet1D((12, ACTION_DIM), **TINY)
    with pytest.raises(ValueError, match="horizon, action_dim"):
        ConditionalUnet1D((1, 8, 8), **TINY)
    with pytest.raises(ValueError, match="kernel_size"):
        ConditionalUnet1D(SHAPE, kernel_size=4, **TINY)
    net = ConditionalUnet1D(SHAPE, **TINY)
    with pytest.raises(ValueError, match=r"\(B, 16, 2\)"):
        net(torch.randn(2, ACTION_DIM, HORIZON), 0.0)  # channels-first by mistake
    with pytest.raises(ValueError, match="noise_level"):
        net(torch.randn(3, *SHAPE), torch.zeros(2))


def test_overfits_one_batch():
    # No cond: x is the only thing telling the 8 samples apart, and every one of the 16 steps has its
    # own target, so the fit needs the input to reach the output at full temporal resolution.
    torch.manual_seed(0)
    net = ConditionalUnet1D(SHAPE, **TINY)
    x, target = torch.randn(8, *SHAPE), torch.randn(8, *SHAPE)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(200):
        loss = (net(x, 10.0) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1e-2, loss.item()
