"""Every method as a policy: training on trajectories, acting from a checkpoint alone, closed-loop runs."""

import json
import os
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from envs.obstacle2d import Obstacle2DEnv, ScriptedExpert
from envs.policy import Policy, load_policy
from envs.runner import run_episodes, summarize
from lightning_modules.checkpoint import build_model
from lightning_modules.teachers import teacher_from_module
from conftest import CONFIG_DIR, run_cli

# Every registered method (configs/model/*.yaml), so a new method is a policy or this test fails.
METHODS = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
PUSHT_ZARR = os.environ.get("PUSHT_ZARR")
needs_pusht = pytest.mark.skipif(not PUSHT_ZARR or not Path(PUSHT_ZARR).exists(), reason="set PUSHT_ZARR to pusht_cchi_v7_replay.zarr")


def compose_policy(overrides, tmp_path):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        del cfg.hydra
    return cfg


# Data settings a method needs beyond obstacle2d's defaults (a sequence model reads one observation per chunk step).
METHOD_DATA = {"lstm_gmm": ["data.horizon=8", "data.n_obs_steps=8", "data.n_action_steps=1"],
               "bet": ["data.horizon=3", "data.n_obs_steps=3", "data.n_action_steps=1"]}


def tiny_obstacle(method, tmp_path):
    data = ["data=obstacle2d", "data.num_episodes=20", "data.batch_size=32", *METHOD_DATA.get(method, [])]
    cfg = compose_policy([f"model={method}", *data], tmp_path)
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    module = build_model(cfg, datamodule.data_shape, datamodule.cond_dim)
    if method == "consistency":  # distillation: an (untrained) conditional EDM policy as the teacher
        teacher = build_model(compose_policy(["model=edm", *data], tmp_path), datamodule.data_shape, datamodule.cond_dim)
        module.attach_teacher(teacher_from_module(teacher))
    if method == "consistency_tuning":  # tuning starts from a (here untrained) conditional EDM policy's checkpoint
        edm_cfg = compose_policy(["model=edm", *data], tmp_path)
        edm = build_model(edm_cfg, datamodule.data_shape, datamodule.cond_dim)
        meta = {"config": OmegaConf.to_container(edm_cfg, resolve=True), "data_shape": list(datamodule.data_shape),
                "cond_dim": datamodule.cond_dim, "method": "edm"}
        torch.save({"difflab": meta, "state_dict": edm.state_dict()}, tmp_path / "edm.ckpt")
        module.init_ckpt = str(tmp_path / "edm.ckpt")
    return cfg, datamodule, module


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_on_trajectories_and_acts(method, tmp_path):
    torch.manual_seed(0)
    cfg, datamodule, module = tiny_obstacle(method, tmp_path)
    trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 3
    steps = {"bc_mse": None, "ddpm": 3, "ncsn": 3, "edm": 3, "consistency": 2, "consistency_training": 2}.get(method, None if module.sampler == "direct" else 30)  # reverse-diffusion on VP needs beta_max * dt < 1
    policy = Policy.from_datamodule(module, datamodule, steps=steps)
    env = Obstacle2DEnv()
    obs = env.reset(seed=0)
    history = [obs] * datamodule.n_obs_steps
    actions = policy.act(history)
    assert actions.shape == (datamodule.n_action_steps, 2) and np.isfinite(actions).all()
    batch = policy.act(np.stack([policy.stack(history)] * 3))
    assert batch.shape == (3, datamodule.n_action_steps, 2)
    if module.clip_denoised:
        # clipped in normalized space: the actions stay inside the demonstrations' range
        low, high = datamodule.action_normalizer.low.numpy(), datamodule.action_normalizer.high.numpy()
        assert (actions >= low - 1e-4).all() and (actions <= high + 1e-4).all()


def test_policy_executes_the_chunk_from_the_current_step(tmp_path):
    """With a 'method' that returns a known chunk, act() returns entries n_obs_steps-1 .. +n_action_steps, unnormalized."""
    _, datamodule, module = tiny_obstacle("bc_mse", tmp_path)
    ramp = torch.linspace(-1, 1, datamodule.horizon)[:, None].repeat(1, 2)
    module.sample = lambda n, cond=None, **kw: ramp.expand(n, -1, -1)
    policy = Policy.from_datamodule(module, datamodule)
    obs = Obstacle2DEnv().reset(seed=1)
    expected = datamodule.action_normalizer.unnormalize(ramp).numpy()[1 : 1 + datamodule.n_action_steps]
    np.testing.assert_allclose(policy.act([obs, obs]), expected, rtol=1e-6)


def test_policy_samples_with_the_sampling_fixes_it_is_given(tmp_path):
    """eps_scale / time_shift_window reach the DDPM sampler on every act(): the actions are those of the sampler
    called with the fix, and differ from the unfixed policy's under the same seed."""
    import functools

    torch.manual_seed(0)
    _, datamodule, module = tiny_obstacle("ddpm", tmp_path)
    module.clip_denoised = False  # an untrained net's x0 saturates the clip, which would hide the scale
    with torch.no_grad():  # the net starts as the zero function, and a scaled zero is zero
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    obs = Obstacle2DEnv().reset(seed=2)
    fixed = Policy.from_datamodule(module, datamodule, steps=5, seed=3, sample_kwargs={"eps_scale": 1.3}).act([obs, obs])
    plain = Policy.from_datamodule(module, datamodule, steps=5, seed=3).act([obs, obs])
    sample = module.sample
    module.sample = functools.partial(sample, eps_scale=1.3)
    reference = Policy.from_datamodule(module, datamodule, steps=5, seed=3).act([obs, obs])
    module.sample = sample
    np.testing.assert_allclose(fixed, reference, rtol=1e-6)
    assert np.abs(fixed - plain).max() > 1e-4


def test_expert_through_the_runner_succeeds_and_scores_are_what_they_claim():
    class ExpertPolicy:
        """The scripted expert behind the Policy interface (one expert per batch row, fixed sides)."""

        n_obs_steps, n_action_steps = 1, 1

        def __init__(self, sides):
            self.experts = [ScriptedExpert(np.random.default_rng(i), noise=0.0, side=s) for i, s in enumerate(sides)]

        def check_env(self, env):
            pass

        def stack(self, history):
            return np.stack([history[-1]["agent_pos"]])

        def act(self, obs):
            return np.stack([[e.act({"agent_pos": o[-1]})] for e, o in zip(self.experts, obs)])

    sides = [-1, 1, -1, 1]
    results = run_episodes(ExpertPolicy(sides), Obstacle2DEnv, seeds=[0, 1, 2, 3])
    summary = summarize(results)
    assert summary["success_rate"] == 1.0 and summary["mean_max_reward"] == 1.0
    assert [r["route"] for r in results] == sides
    assert summary["route_left"] == 0.5 and summary["route_right"] == 0.5
    assert all(0 < r["length"] < Obstacle2DEnv.max_steps for r in results)


def test_policy_refuses_an_environment_with_other_observations(tmp_path):
    _, datamodule, module = tiny_obstacle("ddpm", tmp_path)
    policy = Policy.from_datamodule(module, datamodule)

    class OtherEnv:
        obs_dims = {"state": 5, "keypoint": 18, "agent_pos": 3}

    with pytest.raises(ValueError, match="the policy observes .*agent_pos.*OtherEnv gives"):
        policy.check_env(OtherEnv())
    with pytest.raises(KeyError, match="observation lacks \\['agent_pos'\\]"):
        policy.act([{"state": np.zeros(5)}] * 2)


@pytest.mark.slow
def test_train_obstacle_policy_end_to_end_then_load_and_evaluate(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("train.py", "data=obstacle2d", "data.num_episodes=40", "trainer.max_steps=40", "trainer.val_check_interval=20",
                   "callbacks.rollout.num_episodes=2", "callbacks.rollout.every_n_val=2", "final_eval.num_episodes=3",
                   "model.sampling.steps=4", f"hydra.run.dir={run_dir}")
    assert "Policy:         mean max-reward" in proc.stdout
    metrics = (run_dir / "final" / "metrics.json").read_text()
    assert '"success_rate"' in metrics and '"latency_per_chunk_s"' in metrics
    assert list((run_dir / "rollouts").glob("step_*.gif"))
    ckpts = list((run_dir / "checkpoints").glob("best_step*_reward*.ckpt"))
    assert [c.name.split("_reward")[0] for c in ckpts] == ["best_step0000040"], "chosen by rollout score, which step 20 lacks"

    # a checkpoint alone acts: normalizer, keys and horizons come from it
    ckpt_file = run_dir / "checkpoints" / "last.ckpt"
    policy, datamodule = load_policy(ckpt_file, steps=4)
    assert policy.obs_keys == ["agent_pos"] and policy.horizon == 16 and policy.global_step == 40 and policy.task == "obstacle2d"
    obs = policy.make_env().reset(seed=3)
    assert isinstance(policy.make_env(), Obstacle2DEnv) and policy.act([obs, obs]).shape == (8, 2)
    # the policy owns its normalizers: they are the checkpoint's `policy` entry, fit on the training split
    ckpt = torch.load(ckpt_file, map_location="cpu", weights_only=True)
    assert ckpt["policy"]["task"] == "obstacle2d" and ckpt["policy"]["obs_dims"] == {"agent_pos": 2}
    torch.testing.assert_close(policy.obs_normalizer.low, torch.as_tensor(ckpt["policy"]["obs_normalizer"]["low"]).float())
    # a checkpoint from before that entry (normalizers only under the datamodule's class name) acts the same
    legacy = {k: v for k, v in ckpt.items() if k != "policy"}
    torch.save(legacy, tmp_path / "legacy.ckpt")
    old, _ = load_policy(tmp_path / "legacy.ckpt", steps=4, seed=5)
    new, _ = load_policy(ckpt_file, steps=4, seed=5)
    np.testing.assert_array_equal(old.act([obs, obs]), new.act([obs, obs]))
    old_spec, new_spec = old.spec(), new.spec()
    for key in ("obs_normalizer", "action_normalizer"):
        a, b = old_spec.pop(key), new_spec.pop(key)
        torch.testing.assert_close(a["low"], b["low"])
        torch.testing.assert_close(a["high"], b["high"])
    assert old_spec == new_spec

    out = tmp_path / "eval.json"
    proc = run_cli("evaluate.py", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "metric=policy", "num_episodes=3",
                   "steps=4", f"out={out}", "render=true", "progress=false", "eps_scale=1.01", "sampler=dpmpp_2m")
    assert "mean max-reward" in proc.stdout and out.exists()
    result = json.loads(out.read_text())
    assert result["eps_scale"] == 1.01 and result["sampler"] == "dpmpp_2m" and result["nfe"] == 4
    assert len(list((tmp_path / "eval_videos").glob("episode_*.gif"))) == 3


@needs_pusht
def test_policy_steps_gym_pusht_reproducibly(tmp_path):
    pytest.importorskip("gym_pusht")
    cfg = compose_policy(["experiment=pusht_ddpm", "net=unet1d_tiny", f"data.path={PUSHT_ZARR}"], tmp_path)
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    torch.manual_seed(0)
    module = build_model(cfg, datamodule.data_shape, datamodule.cond_dim)
    runs = []
    for _ in range(2):
        policy = Policy.from_datamodule(module, datamodule, steps=2, seed=7)
        runs.append(run_episodes(policy, policy.make_env, seeds=[100000, 100001], max_steps=12))
    for a, b in zip(*runs):
        assert a["length"] == 12 and a["max_reward"] == b["max_reward"] and 0.0 <= a["max_reward"] <= 1.0
    assert runs[0][0]["max_reward"] != runs[0][1]["max_reward"]  # distinct seeds, distinct episodes

    from envs.obstacle2d import Obstacle2DEnv as Wrong

    with pytest.raises(ValueError, match="trained on another task"):
        run_episodes(policy, Wrong, seeds=[0])
