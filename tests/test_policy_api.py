"""LeRobot's policy interface (issue 21): reset / select_action on the current observation only, and a policy
exported to a folder (safetensors + JSON) that acts exactly like the one it came from."""

from __future__ import annotations

import json
from collections import deque

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from envs.export import export_policy, load_exported
from envs.obstacle2d import Obstacle2DEnv
from envs.policy import Policy
from test_policy import tiny_obstacle


def policy_for(method, tmp_path, seed=7):
    cfg, datamodule, module = tiny_obstacle(method, tmp_path)
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    if method == "bet":  # its k-means bins come from the training actions (setup('fit') in a real run)
        module.fit_bins(datamodule.dataset("train").tensors["x"])
    torch.manual_seed(0)
    with torch.no_grad():  # untrained but not at init, so a wrong weight mapping would show
        for p in module.parameters():
            p.add_(0.01 * torch.randn_like(p))
    steps = {"ddpm": 3, "flow_matching": 3}.get(method)
    return lambda: Policy.from_datamodule(module, datamodule, steps=steps, seed=seed)


@pytest.mark.parametrize("method", ["ddpm", "bet"])
def test_select_action_is_act_on_the_history(method, tmp_path):
    make = policy_for(method, tmp_path)
    stateful, batch = make(), make()
    env_a, env_b = Obstacle2DEnv(), Obstacle2DEnv()
    for episode, steps in ((11, 13), (12, 6)):  # the second episode starts mid-chunk: reset() must drop the queue
        obs_a = env_a.reset(seed=episode)
        obs_b = env_b.reset(seed=episode)
        stateful.reset()
        history = deque([obs_b] * batch.n_obs_steps, maxlen=batch.n_obs_steps)
        chunk: list = []
        for _ in range(steps):
            a = stateful.select_action(obs_a)
            if not chunk:
                chunk = list(batch.act(list(history)))
            b = chunk.pop(0)
            np.testing.assert_array_equal(a, b)
            obs_a, *_ = env_a.step(a)
            obs_b, *_ = env_b.step(b)
            history.append(obs_b)


@pytest.mark.parametrize("method", ["ddpm", "lstm_gmm", "bet", "vae_policy", "flow_matching"])
def test_export_load_acts_exactly_the_same(method, tmp_path):
    make = policy_for(method, tmp_path)
    policy = make()
    folder = export_policy(policy, tmp_path / "exported")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "policy.json"]
    stats = json.loads((folder / "policy.json").read_text())
    np.testing.assert_allclose(stats["action_normalizer"]["low"], policy.action_normalizer.low.numpy())
    loaded = load_exported(folder)
    for key, value in policy.module.state_dict().items():
        torch.testing.assert_close(loaded.module.state_dict()[key], value, rtol=0, atol=0)
    fresh = make()  # the same model and seed, an unused generator, like the loaded policy
    env = Obstacle2DEnv()
    obs = env.reset(seed=5)
    history = [obs] * policy.n_obs_steps
    np.testing.assert_array_equal(loaded.act(history), fresh.act(history))
    assert loaded.spec().keys() == policy.spec().keys() and loaded.nfe == policy.nfe
    # written again over itself: replaced whole, still loadable
    export_policy(loaded, folder)
    assert load_exported(folder).n_action_steps == policy.n_action_steps


def test_load_exported_refuses_what_is_not_one(tmp_path):
    from difflab.errors import CheckpointError, MissingFileError

    with pytest.raises(MissingFileError, match="lacks"):
        load_exported(tmp_path)
    for name in ("model.safetensors", "policy.json"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "config.json").write_text(json.dumps({"format": "lerobot", "version": 1}))
    with pytest.raises(CheckpointError, match="format"):
        load_exported(tmp_path)


def test_a_broken_export_names_the_file_and_what_disagrees(tmp_path):
    """Issue 32: a truncated model.safetensors, a config.json edited to another shape or cut short, and an export
    onto a file or a folder of other files each get one line naming the file; nothing of the user's is replaced."""
    import shutil

    from difflab.errors import CheckpointError, ConfigError

    policy = policy_for("ddpm", tmp_path)()
    good = export_policy(policy, tmp_path / "good")
    cases = {}
    cases["weights"] = shutil.copytree(good, tmp_path / "weights")
    data = (good / "model.safetensors").read_bytes()
    (cases["weights"] / "model.safetensors").write_bytes(data[: len(data) // 3])
    cases["shape"] = shutil.copytree(good, tmp_path / "shape")
    config = json.loads((good / "config.json").read_text())
    config["build"]["net"]["step_embed_dim"] *= 2
    (cases["shape"] / "config.json").write_text(json.dumps(config))
    cases["cut"] = shutil.copytree(good, tmp_path / "cut")
    text = (good / "config.json").read_text()
    (cases["cut"] / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match=r"weights/model\.safetensors is not readable .* truncated"):
        load_exported(cases["weights"])
    with pytest.raises(CheckpointError, match=r"config\.json builds a model whose \S+ is \(.*\), but model\.safetensors holds \("):
        load_exported(cases["shape"])
    with pytest.raises(CheckpointError, match=r"cut/config\.json is not valid JSON"):
        load_exported(cases["cut"])
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="it is a file"):
        export_policy(policy, tmp_path / "notes.txt")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("mine")
    with pytest.raises(ConfigError, match="a folder with other files in it"):
        export_policy(policy, tmp_path / "mine")
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "mine" / "thesis.tex").read_text() == "mine"


class Echo(torch.nn.Module):
    """A stand-in model whose action chunk is a function of what reaches it: the mean of each camera's uint8 frames
    and of the normalised state, so the conversions of select_action can be compared exactly."""

    def __init__(self, horizon=4, action_dim=2):
        super().__init__()
        self.horizon, self.action_dim, self.dummy = horizon, action_dim, torch.nn.Parameter(torch.zeros(1))

    def sample(self, n, cond=None, generator=None, **kwargs):
        assert cond["image"].dtype == torch.uint8
        pixels = cond["image"].float().reshape(n, -1).mean(1)
        state = cond["low_dim"].reshape(n, -1).mean(1)
        return torch.stack([pixels / 255.0, state], dim=1)[:, None, :].expand(n, self.horizon, 2).clone()

    device = torch.device("cpu")

    def nfe(self, *args, **kwargs):
        return 1


def echo_policy():
    from difflab.normalizer import MinMaxNormalizer

    norm = MinMaxNormalizer(np.zeros(2, np.float32), np.ones(2, np.float32))
    return Policy(Echo(), norm, norm, ["agent_pos", "image"], {"agent_pos": 2}, 2, 4, 2, image_shapes={"image": (3, 6, 5)},
                  feature_keys={"agent_pos": "observation.state", "image": "observation.image"})


def test_select_action_takes_lerobot_names_batches_hwc_and_float_frames():
    """Issue 35: float [0, 1] frames were cast to 0/1, LeRobot's names gave a KeyError, a batch and HWC frames were
    refused."""
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (3, 6, 5), dtype=np.uint8)
    state = np.array([0.3, 0.7], np.float32)
    ours = echo_policy()
    want = ours.select_action({"agent_pos": state, "image": frame})
    assert want[0] == pytest.approx((frame.mean() / 255.0 + 1) / 2)  # the action normaliser maps [-1, 1] to [0, 1]
    for image in (frame.astype(np.float32) / 255.0, frame.transpose(1, 2, 0), torch.from_numpy(frame.transpose(1, 2, 0)).float() / 255):
        policy = echo_policy()
        got = policy.select_action({"observation.state": torch.from_numpy(state), "observation.image": image})
        np.testing.assert_array_equal(got, want)
    batched = echo_policy()
    frames = np.stack([frame, 255 - frame])
    got = batched.select_action({"observation.state": np.stack([state, state]), "observation.image": frames.astype(np.float32) / 255})
    assert got.shape == (2, 2)
    np.testing.assert_allclose(got[:, 0], [(frame.mean() / 255.0 + 1) / 2, ((255 - frame).mean() / 255.0 + 1) / 2], rtol=1e-6)


@pytest.mark.parametrize("obs,message", [
    ({"observation.state": np.zeros(2), "image": np.zeros((3, 6, 5), np.float32) + 2.0}, r"camera image is float32 in \[2, 2\]; float frames must be in \[0, 1\]"),
    ({"agent_pos": np.zeros(2), "image": np.zeros((4, 6, 5), np.uint8)}, r"camera image has shape \(4, 6, 5\); the policy expects \(3, 6, 5\) or \(6, 5, 3\)"),
    ({"agent_pos": np.zeros(2), "image": np.zeros((3, 6, 5), np.int32)}, r"camera image is int32; pass uint8 0\.\.255 or float in \[0, 1\]"),
    ({"agent_pos": np.zeros(3), "image": np.zeros((3, 6, 5), np.uint8)}, r"observation agent_pos has shape \(3,\); the policy expects \(2,\)"),
])
def test_select_action_refuses_what_it_cannot_read_in_one_line(obs, message):
    with pytest.raises(ValueError, match=message):
        echo_policy().select_action(obs)
    with pytest.raises(KeyError, match=r"observation lacks \['image'\] \(image may also be named observation\.image\)"):
        echo_policy().select_action({"agent_pos": np.zeros(2)})
