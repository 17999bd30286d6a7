"""export_policy(..., format='lerobot') (issue 35): a state-based DDPM policy as a folder LeRobot's own loader runs.

Without lerobot: the names and shapes against a golden copy of lerobot 0.6.1's DiffusionPolicy state dict and config
fields (tests/data/lerobot_diffusion_golden.json, written by that version), the FiLM column permutation, the
normaliser stats and the refusals. With lerobot (DIFFLAB_LEROBOT_PYTHON=<an interpreter that imports it>, or lerobot
in this one): DiffusionPolicy.from_pretrained loads every tensor strictly and acts as ours on the same observations
and noise.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from difflab.errors import ConfigError
from difflab.normalizer import MinMaxNormalizer
from envs.export import export_policy
from envs.export_lerobot import lerobot_key
from envs.policy import Policy
from lightning_modules.ddpm import DDPM
from lightning_modules.nets.unet1d import ConditionalUnet1D

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((ROOT / "tests" / "data" / "lerobot_diffusion_golden.json").read_text())
KEYS, DIMS = ["keypoint", "agent_pos"], {"keypoint": 18, "agent_pos": 2}  # Push-T's zarr order: keypoint first


def pusht_like_policy(sampler="ancestral", steps=None, clip=True, prediction="eps", seed=0, **sample_kwargs) -> Policy:
    torch.manual_seed(seed)
    net = ConditionalUnet1D((16, 2), cond_dim=40, down_dims=(32, 64, 128), kernel_size=5, n_groups=8, step_embed_dim=64)
    with torch.no_grad():  # trained-looking weights: the zero-initialised last layer would hide a wrong mapping
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    module = DDPM(net, partial(torch.optim.Adam), data_shape=(16, 2), cond_dim=40, num_timesteps=100, schedule="cosine",
                  prediction=prediction, clip_denoised=clip, sampling={"sampler": "ddim", "steps": 10})
    module.run_config = {"model": {"schedule": "cosine", "beta_start": 1e-4, "beta_end": 0.02, "prediction": prediction}}
    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 100, 20).astype(np.float32)
    high = low + rng.uniform(50, 400, 20).astype(np.float32)
    high[3] = low[3]  # a dimension that never moved: ours only centres it
    obs_norm = MinMaxNormalizer(low, high)
    act_norm = MinMaxNormalizer(np.array([10.0, 20.0], np.float32), np.array([500.0, 480.0], np.float32))
    return Policy(module, obs_norm, act_norm, KEYS, DIMS, 2, 16, 8, sampler=sampler, steps=steps, seed=seed,
                  sample_kwargs=sample_kwargs)


def test_names_and_shapes_are_lerobots_tensor_for_tensor(tmp_path):
    from safetensors.torch import load_file

    folder = export_policy(pusht_like_policy(variance="posterior"), tmp_path / "lr", format="lerobot")
    weights = load_file(str(folder / "model.safetensors"))
    assert {k: list(v.shape) for k, v in weights.items()} == GOLDEN["state_dict"]
    config = json.loads((folder / "config.json").read_text())
    assert sorted(config) == GOLDEN["config_fields"]
    assert config["type"] == "diffusion" and config["noise_scheduler_type"] == "DDPM" and config["num_inference_steps"] == 100
    assert config["input_features"] == {"observation.state": {"type": "STATE", "shape": [2]},
                                        "observation.environment_state": {"type": "ENV", "shape": [18]}}
    assert config["beta_schedule"] == "squaredcos_cap_v2" and config["prediction_type"] == "epsilon" and config["clip_sample"]
    assert config["normalization_mapping"]["ENV"] == "MIN_MAX"
    assert sorted(p.name for p in folder.iterdir()) == sorted([
        "config.json", "model.safetensors", "policy_preprocessor.json", "policy_postprocessor.json",
        "policy_preprocessor_step_3_normalizer_processor.safetensors", "policy_postprocessor_step_0_unnormalizer_processor.safetensors"])


def test_the_renamed_permuted_net_is_ours_on_lerobots_observation_order(tmp_path):
    """Map the exported names back and feed the history in LeRobot's per-step order [state, environment_state]:
    the net must give what ours gives on [keypoint, agent_pos]."""
    from safetensors.torch import load_file

    policy = pusht_like_policy(variance="posterior")
    folder = export_policy(policy, tmp_path / "lr", format="lerobot")
    ours = policy.module.net
    back = {lerobot_key(k): k for k in ours.state_dict()}
    twin = ConditionalUnet1D((16, 2), cond_dim=40, down_dims=(32, 64, 128), kernel_size=5, n_groups=8, step_embed_dim=64)
    twin.load_state_dict({back[k]: v for k, v in load_file(str(folder / "model.safetensors")).items()}, strict=True)
    x, t = torch.randn(3, 16, 2), torch.tensor([0.0, 40.0, 99.0])
    cond = torch.randn(3, 2, 20)  # (B, n_obs_steps, keypoint 18 + agent_pos 2)
    lerobot_order = torch.cat([cond[..., 18:], cond[..., :18]], dim=-1)
    torch.testing.assert_close(twin(x, t, lerobot_order.reshape(3, -1)), ours(x, t, cond.reshape(3, -1)), rtol=1e-5, atol=1e-6)


def test_lerobots_min_max_on_the_exported_stats_is_our_normaliser(tmp_path):
    from safetensors.torch import load_file

    policy = pusht_like_policy(variance="posterior")
    folder = export_policy(policy, tmp_path / "lr", format="lerobot")
    stats = load_file(str(folder / "policy_preprocessor_step_3_normalizer_processor.safetensors"))
    obs = torch.from_numpy(np.random.default_rng(2).uniform(0, 600, (50, 20)).astype(np.float32))

    def min_max(x, name):  # LeRobot 0.6.1's NormalizerProcessorStep, MIN_MAX mode
        lo, hi = stats[f"{name}.min"], stats[f"{name}.max"]
        return 2 * (x - lo) / torch.where(hi - lo == 0, torch.tensor(1e-8), hi - lo) - 1

    ours = policy.obs_normalizer.normalize(obs)
    torch.testing.assert_close(min_max(obs[:, 18:], "observation.state"), ours[:, 18:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(min_max(obs[:, :18], "observation.environment_state"), ours[:, :18], rtol=1e-5, atol=1e-5)
    y = torch.rand(7, 2) * 2 - 1
    lo, hi = stats["action.min"], stats["action.max"]
    torch.testing.assert_close((y + 1) / 2 * (hi - lo) + lo, policy.action_normalizer.unnormalize(y), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("make,message", [
    (lambda: pusht_like_policy(variance="beta"), r"posterior variance .* variance=posterior"),
    (lambda: pusht_like_policy("ddim", 10, ddim_spacing="uniform"), r"'leading' levels .* ddim_spacing=uniform"),
    (lambda: pusht_like_policy("ddim", 10, ddim_spacing="leading"), r"use_clipped_model_output=False"),
    (lambda: pusht_like_policy("dpmpp_2m", 10), r"sampler=dpmpp_2m has no LeRobot scheduler"),
    (lambda: pusht_like_policy(prediction="v", variance="posterior"), r"model\.prediction=v"),
])
def test_what_lerobot_cannot_express_is_refused_with_the_reason(tmp_path, make, message):
    with pytest.raises(ConfigError, match=r"format=.lerobot. cannot express this policy: .*" + message):
        export_policy(make(), tmp_path / "lr", format="lerobot")
    assert not (tmp_path / "lr").exists()


def test_a_policy_of_another_method_or_net_is_refused(tmp_path):
    from test_policy_api import policy_for

    with pytest.raises(ConfigError, match=r"it is a BET; LeRobot's Diffusion Policy is a DDPM"):
        export_policy(policy_for("bet", tmp_path)(), tmp_path / "lr", format="lerobot")
    with pytest.raises(ConfigError, match=r"needs observation\.environment_state .* observes only \['agent_pos'\]"):
        export_policy(policy_for("ddpm", tmp_path)(), tmp_path / "lr2", format="lerobot")
    with pytest.raises(ConfigError, match=r"reads observation\.state .* pass features="):
        export_policy(pusht_like_policy(variance="posterior"), tmp_path / "lr3", format="lerobot",
                      features={"keypoint": "observation.environment_state", "agent_pos": "observation.velocity"})


# --- the check with lerobot itself ---------------------------------------------------------------------------

def lerobot_python() -> str | None:
    configured = os.environ.get("DIFFLAB_LEROBOT_PYTHON")
    if configured:
        return configured
    try:
        import lerobot  # noqa: F401
    except ImportError:
        return None
    return sys.executable


def record(policy: Policy, path: Path, episodes: int = 2, chunks: int = 2, ddim: bool = False) -> np.ndarray:
    """Our actions on random observations, each chunk from its own seed, with what LeRobot needs to repeat them."""
    rng = np.random.default_rng(11)
    steps = chunks * policy.n_action_steps
    keypoint = rng.uniform(0, 512, (episodes, steps, 18)).astype(np.float32)
    agent = rng.uniform(0, 512, (episodes, steps, 2)).astype(np.float32)
    seeds = np.arange(episodes * chunks).reshape(episodes, chunks) + 100
    noise = np.stack([[torch.randn((16, 2), generator=torch.Generator().manual_seed(int(s))).numpy() for s in row] for row in seeds])
    actions = np.zeros((episodes, steps, 2), np.float32)
    for e in range(episodes):
        policy.reset()
        for t in range(steps):
            if t % policy.n_action_steps == 0:
                policy.generator = torch.Generator().manual_seed(int(seeds[e, t // policy.n_action_steps]))
            actions[e, t] = policy.select_action({"keypoint": keypoint[e, t], "agent_pos": agent[e, t]})
    np.savez(path, features=np.array(["observation.state", "observation.environment_state"]), actions=actions,
             **{"observation.state": agent, "observation.environment_state": keypoint}, seeds=seeds,
             noise=noise if ddim else np.zeros(0), n_action_steps=policy.n_action_steps)
    return actions


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_lerobot_loads_the_export_strictly_and_acts_as_ours(tmp_path, sampler):
    python = lerobot_python()
    if python is None:
        pytest.skip("lerobot is not importable here: set DIFFLAB_LEROBOT_PYTHON to a Python (>= 3.12 for lerobot 0.6) "
                    "with `lerobot[diffusion]` installed")
    if sampler == "ancestral":
        policy = pusht_like_policy(variance="posterior")
    else:  # LeRobot's DDIM: 'leading' levels, and no clipping (see the refusal above)
        policy = pusht_like_policy("ddim", 10, clip=False, ddim_spacing="leading", eta=0.0)
    folder = export_policy(policy, tmp_path / "lr", format="lerobot")
    actions = record(policy, tmp_path / "recording.npz", ddim=sampler == "ddim")
    out = subprocess.run([python, str(ROOT / "tests" / "lerobot_roundtrip.py"), str(folder), str(tmp_path / "recording.npz")],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["tensors"] == len(GOLDEN["state_dict"])
    print(json.dumps(result))
    assert result["max_abs_diff"] < 1e-4 * result["max_abs_action"], (result, float(np.abs(actions).max()))


@pytest.mark.slow
def test_a_dataset_lerobot_wrote_with_images_reads_exactly(tmp_path):
    python = lerobot_python()
    if python is None:
        pytest.skip("lerobot is not importable here: set DIFFLAB_LEROBOT_PYTHON to a Python with `lerobot[dataset]` installed")
    pytest.importorskip("pyarrow")
    from datamodules.lerobot import LeRobotDataModule

    out = subprocess.run([python, str(ROOT / "tests" / "lerobot_write_images.py"), str(tmp_path / "ds"), str(tmp_path / "truth.npz")],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    truth = np.load(tmp_path / "truth.npz")
    dm = LeRobotDataModule(str(tmp_path / "ds"), None, val_fraction=0.0)
    buffer = dm.buffer()
    np.testing.assert_array_equal(buffer.episode_ends, truth["ends"])
    np.testing.assert_array_equal(buffer.data["agent_pos"], truth["states"])
    np.testing.assert_array_equal(buffer.data["action"], truth["actions"])
    np.testing.assert_array_equal(dm.images(buffer, "image").numpy(), truth["frames"].transpose(0, 3, 1, 2))
