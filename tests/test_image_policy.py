"""Image-based Push-T (issue 21): the frames training reads are the frames evaluation renders, and a policy that
sees trains end to end, acts in the pixel environment and comes back from its checkpoint exactly.

Needs the Diffusion Policy zarr at $PUSHT_ZARR and gym-pusht; the policy tests train on a 3-episode copy of it
written in the same layout, so they stay small.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli

PUSHT_ZARR = os.environ.get("PUSHT_ZARR")
pytestmark = pytest.mark.skipif(not PUSHT_ZARR or not Path(PUSHT_ZARR).exists(), reason="set PUSHT_ZARR to pusht_cchi_v7_replay.zarr")


@pytest.fixture(scope="module")
def tiny_zarr(tmp_path_factory) -> Path:
    """The first three demonstrations with their frames, in the zarr layout the datamodule reads."""
    import zarr

    from datamodules.replay_buffer import ReplayBuffer

    root = zarr.open_group(PUSHT_ZARR, mode="r")
    ends = np.asarray(root["meta/episode_ends"][:3])
    data = {k: np.asarray(root["data"][k][: ends[-1]]) for k in ("state", "keypoint", "action", "img")}
    return ReplayBuffer(data, ends).save(tmp_path_factory.mktemp("pusht_tiny") / "pusht_tiny.zarr")


def test_rendered_frame_matches_the_recorded_image():
    pytest.importorskip("gym_pusht")
    import zarr

    from envs.pusht import PushTEnv

    root = zarr.open_group(PUSHT_ZARR, mode="r")
    env = PushTEnv(cameras=True)
    rows = [0, 161, 5000, 20000]
    frames = []
    for row in rows:
        obs = env.reset(seed=0, state=np.asarray(root["data/state"][row]))
        recorded = np.asarray(root["data/img"][row]).transpose(2, 0, 1)
        diff = np.abs(obs["image"].astype(np.float64) - recorded)
        # the same renderer: identical but for a few anti-aliased edge pixels (measured: mean 0.03-0.12 of 255)
        assert obs["image"].dtype == np.uint8 and obs["image"].shape == (3, 96, 96)
        assert diff.mean() < 0.5 and (diff > 30).mean() < 0.005, (row, diff.mean(), (diff > 30).mean())
        frames.append(obs["image"].astype(np.float64))
    # and another step's picture is far from it: the check can fail
    assert np.abs(frames[0] - frames[2]).mean() > 5.0
    env.close()


def test_observation_frame_has_no_action_marker():
    pytest.importorskip("gym_pusht")
    from envs.pusht import PushTEnv

    env = PushTEnv(render_size=96, cameras=True)
    obs = env.reset(seed=3)
    target = obs["agent_pos"] + np.array([40.0, -30.0])
    obs, *_ = env.step(target)
    shown = env.render().transpose(2, 0, 1).astype(int)  # the video frame draws the action as a red cross
    seen = obs["image"].astype(int)
    differs = np.argwhere(np.abs(shown - seen).max(axis=0) > 0)
    assert len(differs) > 0
    marker = target / 512 * 96  # (x, y) in the 96-pixel frame
    assert np.abs(differs[:, [1, 0]] - marker).max() <= 6  # every difference is the marker, nothing else
    env.close()


def test_image_windows_hold_uint8_frames_once(tiny_zarr):
    from datamodules.pusht import PushTDataModule

    dm = PushTDataModule(str(tiny_zarr), obs_keys=["image", "agent_pos"], val_fraction=0.0, batch_size=8)
    assert dm.obs_spec == {"image_shapes": {"image": [3, 96, 96]}, "low_dim": 2, "n_obs_steps": 2}
    dm.setup()
    train = dm.dataset("train")
    frames = train.images["image"]
    assert frames.dtype == torch.uint8 and len(frames) == dm.buffer().num_steps  # one copy, not one per window
    batch = train.__getitems__([0, 5, 40])
    assert batch["cond"]["image"].shape == (3, 2, 3, 96, 96) and batch["cond"]["image"].dtype == torch.uint8
    assert batch["cond"]["low_dim"].shape == (3, 2, 2) and batch["x"].shape == (3, 16, 2)
    # window 40's newest frame is step 40 of episode 0 (the first window's history is padded by one step)
    import zarr

    recorded = np.rint(np.asarray(zarr.open_group(str(tiny_zarr), mode="r")["data/img"][40])).astype(np.uint8)
    np.testing.assert_array_equal(batch["cond"]["image"][2, 1].numpy(), recorded.transpose(2, 0, 1))


def test_tiny_image_policy_trains_acts_in_pixels_and_reloads(tiny_zarr, tmp_path):
    pytest.importorskip("gym_pusht")
    from envs.policy import load_policy
    from envs.runner import run_episodes

    run_dir = tmp_path / "run"
    run_cli("train.py", "experiment=pusht_image", "obs_encoder=conv_small", "net=unet1d_tiny", f"data.path={tiny_zarr}",
            "data.batch_size=16", "trainer.max_steps=4", "trainer.val_check_interval=4", "callbacks.rollout.num_episodes=1",
            "callbacks.rollout.max_steps=8", "final_eval.num_episodes=1", "callbacks.ema.warmup=false", "callbacks.ema.decay=0.5",
            f"hydra.run.dir={run_dir}", "logger=csv")
    ckpt_path = run_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert ckpt["difflab"]["obs_spec"]["image_shapes"] == {"image": [3, 96, 96]}
    assert ckpt["policy"]["image_shapes"] == {"image": [3, 96, 96]}
    encoder_keys = [k for k in ckpt["state_dict"] if k.startswith("obs_encoder.")]
    assert encoder_keys  # the encoder trains with the method and is saved with it
    raw = ckpt["current_model_state"]  # the raw weights beside the EMA average Lightning stores as state_dict
    assert any(not torch.equal(ckpt["state_dict"][k], raw[k]) for k in encoder_keys)  # the encoder is averaged too

    policy, _ = load_policy(ckpt_path, seed=3)
    again, _ = load_policy(ckpt_path, seed=3)
    for key in encoder_keys:
        torch.testing.assert_close(policy.module.state_dict()[key], ckpt["state_dict"][key], rtol=0, atol=0)
    env = policy.make_env()
    assert env.image_shapes == {"image": (3, 96, 96)}
    obs = env.reset(seed=100000)
    np.testing.assert_array_equal(policy.act([obs, obs]), again.act([obs, obs]))  # exact after reload
    results = run_episodes(policy, policy.make_env, seeds=[100000, 100001], max_steps=10)
    assert all(r["length"] == 10 and 0.0 <= r["max_reward"] <= 1.0 for r in results)

    from envs.export import export_policy, load_exported

    exported = load_exported(export_policy(again, tmp_path / "exported"), seed=11)  # no checkpoint, no run config
    fresh, _ = load_policy(ckpt_path, seed=11)
    np.testing.assert_array_equal(exported.act([obs, obs]), fresh.act([obs, obs]))
    exported.reset()
    assert exported.select_action(obs).shape == (2,)

    from envs.pusht import PushTEnv

    with pytest.raises(ValueError, match="cameras=True"):
        policy.check_env(PushTEnv())  # a state-only environment cannot feed a policy that sees


@pytest.mark.parametrize("method", ["ddpm", "flow_matching", "consistency_training", "bet", "lstm_gmm", "bc_mse"])
def test_every_method_sees_through_the_encoder(method, tiny_zarr, tmp_path):
    from hydra.utils import instantiate

    from lightning_modules.checkpoint import build_model
    from test_policy import METHOD_DATA, compose_policy

    cfg = compose_policy(["data=pusht", f"model={method}", "net=unet1d_tiny", "obs_encoder=conv_small", f"data.path={tiny_zarr}",
                          "data.obs_keys=[image,agent_pos]", "data.batch_size=8", *METHOD_DATA.get(method, []),
                          *(["model.total_steps=10"] if method == "consistency_training" else [])], tmp_path)
    dm = instantiate(cfg.data)
    dm.setup()
    torch.manual_seed(0)
    module = build_model(cfg, dm.data_shape, dm.cond_dim, dm.obs_spec)
    assert module.cond_dim == module.obs_encoder.out_dim == dm.n_obs_steps * (64 + 2)
    if method == "bet":
        module.fit_bins(dm.dataset("train").tensors["x"])
    with torch.no_grad():  # off the init, where a zero-initialised conditioning layer passes no gradient back yet
        for p in module.parameters():
            p.add_(0.01 * torch.randn_like(p))
    batch = dm.dataset("train").__getitems__(list(range(0, 80, 10)))
    loss = module.loss(module.encoded(batch))
    loss.backward()
    assert torch.isfinite(loss)
    # the loss reaches the pixels' weights: the encoder trains with the method
    first_conv = module.obs_encoder.cameras["image"].backbone[0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    module.eval()
    cond = {k: v[:3] for k, v in batch["cond"].items()}
    x = module.sample(3, cond=cond, **module.quick_sampling)
    assert x.shape == (3, *dm.data_shape) and torch.isfinite(x).all()


def _image_module(model, tiny_zarr, tmp_path, seed):
    from hydra.utils import instantiate

    from lightning_modules.checkpoint import build_model
    from test_policy import compose_policy

    cfg = compose_policy(["data=pusht", f"model={model}", "net=unet1d_tiny", "obs_encoder=conv_small", f"data.path={tiny_zarr}",
                          "data.obs_keys=[image,agent_pos]", "data.batch_size=8"], tmp_path)
    dm = instantiate(cfg.data)
    dm.setup()
    torch.manual_seed(seed)
    return cfg, dm, build_model(cfg, dm.data_shape, dm.cond_dim, dm.obs_spec)


def test_distillation_teacher_sees_the_pictures_through_its_own_encoder(tiny_zarr, tmp_path):
    from lightning_modules.teachers import teacher_from_module

    _, dm, student = _image_module("consistency", tiny_zarr, tmp_path, seed=0)
    _, _, edm = _image_module("edm", tiny_zarr, tmp_path, seed=1)
    with torch.no_grad():  # off the init, where a zero-initialised conditioning layer would ignore any features
        for p in edm.parameters():
            p.add_(0.01 * torch.randn_like(p))
    teacher = teacher_from_module(edm)
    # an EDM teacher with the student's net warm-starts it, encoder included (the net reads the encoder's features)
    assert student.warm_start_refusal(teacher) is None
    student.warm_start_from(teacher)
    for key, value in edm.obs_encoder.state_dict().items():
        torch.testing.assert_close(student.obs_encoder.state_dict()[key], value, rtol=0, atol=0)
    with torch.no_grad():  # then the two encoders part, as they do once the student trains
        for p in student.obs_encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))

    batch = dm.dataset("train").__getitems__(list(range(0, 80, 10)))
    seen = []
    denoise = teacher.denoise
    teacher.denoise = lambda x, s, cond=None: seen.append(cond) or denoise(x, s, cond)
    student.attach_teacher(teacher)
    loss = student.loss(student.encoded(batch))
    assert torch.isfinite(loss) and seen
    assert all(isinstance(c, dict) and c["image"] is batch["cond"]["image"] for c in seen)  # the raw frames, not the student's features

    obs = {k: v[:4] for k, v in batch["cond"].items()}
    x, sigma = torch.randn(4, *dm.data_shape), torch.full((4,), 0.5)
    with torch.no_grad():
        got = denoise(x, sigma, obs)
        own = edm.denoise(x, sigma, edm.obs_encoder(obs))
        students = edm.denoise(x, sigma, student.obs_encoder.eval()(obs))
    torch.testing.assert_close(got, own)
    assert (got - students).abs().max() > 1e-4  # the student's features would have given another answer


def test_teacher_with_other_observations_is_refused(tiny_zarr, tmp_path):
    from omegaconf import OmegaConf

    from difflab.errors import ConfigError
    from lightning_modules.teachers import load_teacher

    cfg, dm, edm = _image_module("edm", tiny_zarr, tmp_path, seed=0)
    meta = {"config": OmegaConf.to_container(cfg, resolve=True), "data_shape": list(dm.data_shape), "cond_dim": edm.cond_dim,
            "obs_spec": dm.obs_spec, "method": "edm"}
    torch.save({"difflab": meta, "state_dict": edm.state_dict()}, tmp_path / "edm.ckpt")
    teacher = load_teacher(tmp_path / "edm.ckpt", dm.data_shape, edm.cond_dim, obs_spec=dm.obs_spec)
    assert teacher.module.obs_encoder is not None
    with pytest.raises(ConfigError, match="camera images .* the state only"):
        load_teacher(tmp_path / "edm.ckpt", dm.data_shape, dm.cond_dim, obs_spec=None)  # the state-only student's cond
    other = {**dm.obs_spec, "n_obs_steps": dm.obs_spec["n_obs_steps"] + 1}
    with pytest.raises(ConfigError, match="observation steps"):
        load_teacher(tmp_path / "edm.ckpt", dm.data_shape, edm.cond_dim, obs_spec=other)
