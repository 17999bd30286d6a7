"""Condition (nets/embeddings.py): the one place a net checks, flattens and mixes in its condition.

tests/data/cond_embedding_golden.pt was written by the nets of commit f9df013, before Condition existed: tiny nets
with perturbed weights in that commit's state-dict format, fixed inputs and their outputs, every tensor of a case
packed into one (torch.save's per-tensor zip entries would otherwise be most of the file). Loading those weights
strictly and reproducing the outputs bit for bit is the checkpoint-compatibility check.
"""

import copy
import functools
import math
import pickle
from pathlib import Path

import pytest
import torch

from lightning_modules.nets import MLP, ConditionalUnet1D, TransformerForDiffusion1D
from lightning_modules.nets.embeddings import Condition
from lightning_modules.nets.param_groups import weight_matrix_groups

GOLDEN = Path(__file__).parent / "data" / "cond_embedding_golden.pt"
CLASSES = {cls.__name__: cls for cls in (MLP, ConditionalUnet1D, TransformerForDiffusion1D)}


@functools.cache
def golden() -> dict:
    return torch.load(GOLDEN)


def unpack(case: dict) -> dict[str, torch.Tensor]:
    sizes = [math.prod(shape) for _, shape in case["layout"]]
    return {name: t.reshape(shape) for (name, shape), t in zip(case["layout"], case["flat"].split(sizes))}


def old_net(case: dict) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    tensors = unpack(case)
    state = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
    net = CLASSES[case["cls"]](**case["kwargs"])
    net.load_state_dict(state, strict=True)
    return net.eval(), state, tensors


@pytest.mark.parametrize("name", ["mlp", "unet1d", "transformer1d"])
def test_old_checkpoints_load_and_give_the_old_outputs_bit_for_bit(name):
    net, state, t = old_net(golden()[name])
    # Same keys in the same order: state_dict() still writes the old names, so exports and older checkouts read it.
    assert list(net.state_dict()) == list(state)
    with torch.no_grad():
        assert torch.equal(net(t["x"], t["noise_level"], t["cond"]), t["out"])
        cond_3d = t["cond"].reshape(len(t["cond"]), *golden()[name]["cond_3d"])
        assert torch.equal(net(t["x"], t["noise_level"], cond_3d), t["out_3d"])


def test_transformer_optimizer_groups_keep_their_parameter_order():
    # Optimizer state in a checkpoint is matched to parameters by position, not by name.
    case = golden()["transformer1d"]
    net, _, _ = old_net(case)
    index = {p.data_ptr(): i for i, p in enumerate(net.state_dict(keep_vars=True).values())}
    assert [[index[p.data_ptr()] for p in g["params"]] for g in weight_matrix_groups(net)] == case["groups"]


@pytest.mark.parametrize("name", ["mlp", "transformer1d"])
def test_state_dict_round_trips_through_copies_pickles_and_parameter_names(name):
    net, state, t = old_net(golden()[name])
    args = (t["x"], t["noise_level"], t["cond"])
    for other in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert list(other.state_dict()) == list(state)
        with torch.no_grad():
            assert torch.equal(other(*args), t["out"])
    # named_parameters() spells the layers `condition.*`: a dict of those loads as well.
    fresh = CLASSES[golden()[name]["cls"]](**golden()[name]["kwargs"]).eval()
    fresh.load_state_dict(dict(net.named_parameters()), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(*args), t["out"])


@pytest.mark.parametrize("mode,dim", [("add", 8), ("concat", 0), ("tokens", 8)])
def test_errors_are_one_line_and_name_the_shapes(mode, dim):
    cond = Condition(6, mode, dim, n_obs_steps=2)
    emb = torch.zeros(2, 1, 8) if mode == "tokens" else torch.zeros(2, 8)
    with pytest.raises(ValueError, match=r"^the net was built with cond_dim=6, so cond \(B, 6\) is required$"):
        cond(emb, None, torch.float32)
    with pytest.raises(ValueError, match=r"^cond must have shape \(2, 6\), got \(2, 5\)$"):
        cond(emb, torch.zeros(2, 5), torch.float32)
    with pytest.raises(ValueError, match=r"^cond must have shape \(2, 6\), got \(2, 2, 2\) \(flattened: \(2, 4\)\)$"):
        cond(emb, torch.zeros(2, 2, 2), torch.float32)
    with pytest.raises(ValueError, match=r"^cond must have shape \(2, 6\), got \(\)$"):
        cond(emb, torch.tensor(1.0), torch.float32)
    with pytest.raises(ValueError, match=r"^got a cond tensor, but the net was built with cond_dim=None$"):
        Condition(None, mode, dim)(emb, torch.zeros(2, 6), torch.float32)


@pytest.mark.parametrize("mode,dim,width", [("add", 8, 8), ("concat", 0, 14), ("tokens", 8, 8)])
def test_modes_flatten_a_history_and_follow_the_net_dtype(mode, dim, width):
    cond = Condition(6, mode, dim, n_obs_steps=3).double()
    emb = torch.zeros(2, 1, 8, dtype=torch.float64) if mode == "tokens" else torch.zeros(2, 8, dtype=torch.float64)
    history = torch.randn(2, 3, 2)  # float32 into a float64 net: cast, not refused
    out = cond(emb, history, torch.float64)
    assert out.dtype == torch.float64
    assert out.shape == ((2, 1 + 3, 8) if mode == "tokens" else (2, width))
    assert torch.equal(out, cond(emb, history.reshape(2, 6), torch.float64))
    assert Condition(None, mode, dim)(emb, None, torch.float64) is emb


def test_bad_mode_and_token_split_are_refused_at_construction():
    with pytest.raises(ValueError, match="mode must be one of"):
        Condition(4, "film")
    with pytest.raises(ValueError, match="cond_dim 5 must be divisible by n_obs_steps 2"):
        Condition(5, "tokens", 8, n_obs_steps=2)


def test_condition_checks_live_only_in_embeddings():
    nets = Path(__file__).resolve().parents[1] / "lightning_modules" / "nets"
    for message in ("cond must have shape", "so cond (B,", "cond_dim=None"):
        assert [p.name for p in sorted(nets.glob("*.py")) if message in p.read_text()] == ["embeddings.py"], message
