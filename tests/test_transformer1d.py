"""TransformerForDiffusion1D (Diffusion Policy's time-series transformer): the net contract on action chunks,
its attention masks, its sizes, its weight-decay groups and its errors."""

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import CONFIG_DIR
from lightning_modules.nets import TransformerForDiffusion1D

HORIZON, ACTION_DIM, N_OBS, OBS_DIM = 16, 2, 2, 20  # PushT: 16-step chunks of 2-D actions, two 20-dim observations
SHAPE, COND_DIM = (HORIZON, ACTION_DIM), N_OBS * OBS_DIM
# Two layers of width 32 without dropout: deterministic in train mode too, and fits in about a second.
TINY = dict(n_layer=2, n_head=2, n_emb=32, p_drop_emb=0.0, p_drop_attn=0.0)


def randomised(net: torch.nn.Module) -> torch.nn.Module:
    # The zero-initialised head makes a fresh net the constant 0; perturb every parameter
    # so that "depends on token j" is a statement about the wiring and the masks.
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def from_config(name: str, n_obs_steps: int = N_OBS, **kwargs) -> TransformerForDiffusion1D:
    # The net reads n_obs_steps from the data config by interpolation: give it one.
    cfg = OmegaConf.create({"data": {"n_obs_steps": n_obs_steps}, "net": OmegaConf.load(CONFIG_DIR / "net" / f"{name}.yaml")})
    return instantiate(cfg.net, **kwargs)


@pytest.mark.parametrize("name,low,high", [("transformer1d", 8.9e6, 9.1e6), ("transformer1d_small", 1.1e6, 1.3e6)])
def test_config_parameter_counts(name, low, high):
    # Paper (Chi et al. 2023, low-dim Push-T): "about 9M"; this net has 8,965,122. The small one has 1,196,034.
    with torch.device("meta"):
        net = from_config(name, data_shape=SHAPE, cond_dim=COND_DIM)
    assert isinstance(net, TransformerForDiffusion1D) and net.n_obs_steps == N_OBS and net.obs_dim == OBS_DIM
    n = sum(p.numel() for p in net.parameters())
    assert low <= n <= high, n


def test_paper_config_count_matches_the_closed_form():
    # 8 pre-LN decoder layers of width 256 (self-attn, cross-attn, 4x GELU MLP, 3 LayerNorms), the MLP memory
    # encoder, the two input projections, both positional tables, the final LayerNorm and the head.
    e = 256
    attn = 4 * e * e + 4 * e
    mlp = 2 * 4 * e * e + 4 * e + e
    layer = 2 * attn + mlp + 3 * 2 * e
    expected = 8 * layer + mlp + (ACTION_DIM + 1) * e + (OBS_DIM + 1) * e + HORIZON * e + (1 + N_OBS) * e + 2 * e + (e + 1) * ACTION_DIM
    with torch.device("meta"):
        net = from_config("transformer1d", data_shape=SHAPE, cond_dim=COND_DIM)
    assert sum(p.numel() for p in net.parameters()) == expected == 8_965_122


def test_fresh_net_is_the_zero_function_and_keeps_the_shape():
    net = from_config("transformer1d_small", data_shape=SHAPE, cond_dim=COND_DIM)
    x, cond = torch.randn(3, *SHAPE), torch.randn(3, COND_DIM)
    for t in (torch.tensor([0.0, 10.0, 99.0]), torch.tensor(5.0), 5.0):
        out = net(x, t, cond)
        assert out.shape == x.shape and out.abs().max() == 0


def test_history_and_flat_cond_agree_and_scalar_noise_levels_broadcast():
    net = randomised(TransformerForDiffusion1D(SHAPE, COND_DIM, n_obs_steps=N_OBS, **TINY)).eval()
    x, cond = torch.randn(3, *SHAPE), torch.randn(3, COND_DIM)
    with torch.no_grad():
        batched = net(x, torch.full((3,), 7.0), cond)
        torch.testing.assert_close(net(x, 7.0, cond.reshape(3, N_OBS, OBS_DIM)), batched)
        torch.testing.assert_close(net(x, torch.tensor(7.0), cond), batched)


def test_output_depends_on_cond_noise_level_and_embedding_scale():
    net = randomised(TransformerForDiffusion1D(SHAPE, COND_DIM, n_obs_steps=N_OBS, **TINY)).eval()
    x, t, cond = torch.randn(2, *SHAPE), torch.tensor([3.0, 3.0]), torch.randn(2, COND_DIM)
    with torch.no_grad():
        reference = net(x, t, cond)
        assert not torch.allclose(reference, net(x, t, cond + 1.0), atol=1e-4)
        assert not torch.allclose(reference, net(x, t * 10, cond), atol=1e-4)
        scaled = TransformerForDiffusion1D(SHAPE, COND_DIM, n_obs_steps=N_OBS, embedding_scale=10.0, **TINY)
        scaled.load_state_dict(net.state_dict())
        torch.testing.assert_close(scaled.eval()(x, t, cond), net(x, t * 10, cond))


@pytest.mark.parametrize("j", [0, 5, HORIZON - 1])
def test_causal_self_attention_hides_later_actions(j):
    net = randomised(TransformerForDiffusion1D(SHAPE, COND_DIM, n_obs_steps=N_OBS, **TINY)).eval()
    x, t, cond = torch.randn(2, *SHAPE), torch.tensor([4.0, 40.0]), torch.randn(2, COND_DIM)
    changed = x.clone()
    changed[:, j] += 1.0
    with torch.no_grad():
        a, b = net(x, t, cond), net(changed, t, cond)
    assert torch.equal(a[:, :j], b[:, :j])  # masked weights are exactly 0, so earlier tokens are bit-identical
    assert (a[:, j] - b[:, j]).abs().min() > 1e-4
    if j + 1 < HORIZON:
        assert (a[:, j + 1 :] - b[:, j + 1 :]).abs().amax(dim=(1, 2)).min() > 1e-4


def test_without_causal_attention_earlier_tokens_see_later_ones():
    net = randomised(TransformerForDiffusion1D(SHAPE, COND_DIM, n_obs_steps=N_OBS, causal_attn=False, **TINY)).eval()
    x, t, cond = torch.randn(2, *SHAPE), torch.tensor([4.0, 40.0]), torch.randn(2, COND_DIM)
    changed = x.clone()
    changed[:, -1] += 1.0
    with torch.no_grad():
        a, b = net(x, t, cond), net(changed, t, cond)
        assert (a[:, 0] - b[:, 0]).abs().max() > 1e-4
        # and action token 0 reads the last observation, which the causal memory mask hides from it
        late_obs = cond.clone()
        late_obs[:, -OBS_DIM:] += 1.0
        assert (a[:, 0] - net(x, t, late_obs)[:, 0]).abs().max() > 1e-4


@pytest.mark.parametrize("k", [1, 2, 3])
def test_causal_memory_mask_hides_later_observations(k):
    n_obs, obs_dim = 4, 3
    net = randomised(TransformerForDiffusion1D(SHAPE, n_obs * obs_dim, n_obs_steps=n_obs, **TINY)).eval()
    x, t, cond = torch.randn(2, *SHAPE), torch.tensor([4.0, 40.0]), torch.randn(2, n_obs * obs_dim)
    changed = cond.reshape(2, n_obs, obs_dim).clone()
    changed[:, k] += 1.0
    with torch.no_grad():
        a, b = net(x, t, cond), net(x, t, changed.reshape(2, -1))
    assert torch.equal(a[:, :k], b[:, :k])
    assert (a[:, k] - b[:, k]).abs().min() > 1e-4


def test_every_action_token_sees_the_noise_level():
    net = randomised(TransformerForDiffusion1D(SHAPE, COND_DIM, n_obs_steps=N_OBS, **TINY)).eval()
    x, cond = torch.randn(2, *SHAPE), torch.randn(2, COND_DIM)
    with torch.no_grad():
        diff = (net(x, 3.0, cond) - net(x, 60.0, cond)).abs().amax(dim=2)
    assert diff.min() > 1e-4  # token 0 included: the time token is the one memory slot nobody is masked from


def test_runs_without_cond():
    net = randomised(TransformerForDiffusion1D(SHAPE, None, n_obs_steps=N_OBS, **TINY)).eval()
    assert net.n_obs_steps == 0 and net.cond_obs_emb is None
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        out = net(x, torch.tensor([1.0, 2.0, 3.0]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_gradients_reach_every_parameter():
    for n_cond_layers in (0, 1):
        net = randomised(TransformerForDiffusion1D(SHAPE, COND_DIM, n_obs_steps=N_OBS, n_cond_layers=n_cond_layers, **TINY))
        net(torch.randn(4, *SHAPE), torch.rand(4) * 100, torch.randn(4, COND_DIM)).square().mean().backward()
        for name, p in net.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, (n_cond_layers, name)


def test_optim_groups_decay_only_the_weight_matrices():
    n_layer = 3
    net = TransformerForDiffusion1D(SHAPE, COND_DIM, n_obs_steps=N_OBS, **{**TINY, "n_layer": n_layer})
    decay, no_decay = net.optim_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in net.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert not decayed & kept and decayed | kept == set(names.values())
    # per decoder layer: self- and cross-attention in/out projections and the two MLP layers; then the action
    # and observation projections, the memory MLP's two layers and the head
    assert len(decayed) == 6 * n_layer + 5, sorted(decayed)
    assert all(n.endswith("weight") and "norm" not in n for n in decayed)
    assert {"pos_emb", "cond_pos_emb", "ln_f.weight", "head.bias", "decoder.layers.0.norm1.weight",
            "decoder.layers.0.self_attn.in_proj_bias"} <= kept
    torch.optim.AdamW(net.optim_groups(0.1), lr=1e-4)  # the groups are what an optimizer takes


def test_a_method_on_the_transformer_trains_with_its_decay_split():
    """configure_optimizers gives the net's groups: the optimizer's weight decay on the matrices, 0 elsewhere, and
    every parameter of the module in exactly one group."""
    import functools

    from lightning_modules.ddpm import DDPM

    net = TransformerForDiffusion1D(SHAPE, COND_DIM, n_obs_steps=N_OBS, **TINY)
    module = DDPM(net, functools.partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.1), data_shape=SHAPE, cond_dim=COND_DIM,
                  num_timesteps=10, sampling={"steps": 5})
    optimizer = module.configure_optimizers()
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in module.parameters()) and len(set(ids)) == len(ids)
    assert {id(p) for p in decay["params"]} == {id(p) for p in net.optim_groups()[0]["params"]}


def test_bad_shapes_and_settings_give_clear_errors():
    net = TransformerForDiffusion1D(SHAPE, COND_DIM, n_obs_steps=N_OBS, **TINY)
    x, t, cond = torch.randn(2, *SHAPE), torch.zeros(2), torch.randn(2, COND_DIM)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 16, 2\)"):
        net(torch.randn(2, 8, 2), t, cond)
    with pytest.raises(ValueError, match=r"cond must have shape \(2, 40\)"):
        net(x, t, torch.randn(2, 39))
    with pytest.raises(ValueError, match="cond_dim=40"):
        net(x, t)
    with pytest.raises(ValueError, match="cond_dim=None"):
        TransformerForDiffusion1D(SHAPE, None, **TINY)(x, t, cond)
    with pytest.raises(ValueError, match="noise_level"):
        net(x, torch.zeros(3), cond)
    with pytest.raises(ValueError, match="cond_dim 40 must be divisible by n_obs_steps 3"):
        TransformerForDiffusion1D(SHAPE, COND_DIM, n_obs_steps=3, **TINY)
    with pytest.raises(ValueError, match="data_shape"):
        TransformerForDiffusion1D((1, 8, 8), None, **TINY)
    with pytest.raises(ValueError, match="divisible by n_head"):
        TransformerForDiffusion1D(SHAPE, COND_DIM, n_obs_steps=N_OBS, n_layer=1, n_head=3, n_emb=32)


def test_short_fit_regresses_a_fixed_chunk():
    torch.manual_seed(0)
    net = TransformerForDiffusion1D(SHAPE, COND_DIM, n_obs_steps=N_OBS, **TINY)
    x, t, cond = torch.randn(8, *SHAPE), torch.randint(0, 100, (8,)).float(), torch.randn(8, COND_DIM)
    target = torch.sin(torch.linspace(0, 3, HORIZON))[None, :, None] * torch.tensor([1.0, -0.5]) + 0.1 * torch.randn(8, *SHAPE)
    optimizer = torch.optim.AdamW(net.optim_groups(0.0), lr=3e-3)
    first = None
    for _ in range(300):
        loss = (net(x, t, cond) - target).square().mean()
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = (net(x, t, cond) - target).square().mean().item()
    assert first == pytest.approx(float(target.square().mean()))  # the zero function's loss
    assert final < first / 100, (first, final)  # measured: 529x
