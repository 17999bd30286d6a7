"""data=lerobot: a LeRobotDataset v3.0 folder, written here in LeRobot's layout, read back against the arrays it was
written from (issue 21). Never a download."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("pyarrow")
pytest.importorskip("av")

from datamodules.lerobot import LeRobotDataModule  # noqa: E402
from difflab.errors import ConfigError, DataError, MissingFileError  # noqa: E402
from lerobot_layout import write_lerobot  # noqa: E402

KEYS = {"agent_pos": "observation.state", "image": "observation.image"}


def episodes(lengths=(23, 17, 30), seed=0):
    """Smooth frames (a moving disc on a gradient): what a video codec keeps nearly exactly, unlike noise."""
    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:96, 0:96]
    for n in lengths:
        state = rng.uniform(0, 512, (n, 2)).astype(np.float32)
        action = (state + rng.normal(0, 5, (n, 2))).astype(np.float32)
        frames = np.zeros((n, 96, 96, 3), dtype=np.uint8)
        for t in range(n):
            cx, cy = state[t] / 512 * 96
            disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < 100
            frames[t, ..., 0] = (xx * 2).astype(np.uint8)
            frames[t, ..., 1] = np.where(disc, 230, 40)
            frames[t, ..., 2] = (yy * 2).astype(np.uint8)
        out.append({"state": state, "action": action, "image": frames})
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    eps = episodes()
    return write_lerobot(tmp_path_factory.mktemp("lerobot") / "pusht_like", eps), eps


def test_reader_returns_the_arrays_it_was_written_from(dataset):
    root, eps = dataset
    dm = LeRobotDataModule(str(root), KEYS, val_fraction=0.0, batch_size=4)
    assert dm.env_obs_dims == {"agent_pos": 2} and dm.env_image_shapes == {"image": (3, 96, 96)} and dm.action_dim == 2
    buffer = dm.buffer()
    np.testing.assert_array_equal(buffer.episode_ends, np.cumsum([23, 17, 30]))
    np.testing.assert_array_equal(buffer.data["agent_pos"], np.concatenate([e["state"] for e in eps]))
    np.testing.assert_array_equal(buffer.data["action"], np.concatenate([e["action"] for e in eps]))
    frames = dm.images(buffer, "image")
    written = torch.from_numpy(np.concatenate([e["image"] for e in eps])).permute(0, 3, 1, 2)
    assert frames.dtype == torch.uint8 and frames.shape == written.shape
    error = (frames.float() - written.float()).abs()
    assert error.mean() < 3.0, error.mean()  # AV1 is lossy; a frame off by one would be ~20 (the disc moves)
    # every frame is closest to its own written frame: the episode offsets in the shared video files are right
    per_frame = (frames.float()[:, None] - written.float()[None]).abs().mean(dim=(2, 3, 4))
    np.testing.assert_array_equal(per_frame.argmin(dim=1).numpy(), np.arange(len(written)))


def test_trains_batches_through_the_trajectory_path(dataset):
    root, _ = dataset
    dm = LeRobotDataModule(str(root), KEYS, task="pusht", val_fraction=0.34, batch_size=4)
    assert dm.obs_spec == {"image_shapes": {"image": [3, 96, 96]}, "low_dim": 2, "n_obs_steps": 2}
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (4, 16, 2) and batch["x"].abs().max() <= 1.0
    assert batch["cond"]["image"].shape == (4, 2, 3, 96, 96) and batch["cond"]["image"].dtype == torch.uint8
    spec = dm.policy_spec()
    assert spec["task"] == "pusht" and spec["image_shapes"] == {"image": [3, 96, 96]}


def test_stats_normalizer_uses_meta_stats(dataset):
    root, eps = dataset
    dm = LeRobotDataModule(str(root), {"agent_pos": "observation.state"}, normalizer="stats", val_fraction=0.34)
    dm.fit_normalizers()
    stats = json.loads((root / "meta" / "stats.json").read_text())
    np.testing.assert_allclose(dm.obs_normalizer.low.numpy(), stats["observation.state"]["min"], rtol=1e-6)
    np.testing.assert_allclose(dm.action_normalizer.high.numpy(), stats["action"]["max"], rtol=1e-6)
    fit = LeRobotDataModule(str(root), {"agent_pos": "observation.state"}, val_fraction=0.34)
    fit.fit_normalizers()  # fit on the training episodes only: a narrower range than the whole dataset's
    assert (fit.obs_normalizer.high <= dm.obs_normalizer.high + 1e-4).all()


def test_bad_folders_fail_with_what_to_do(dataset, tmp_path):
    root, _ = dataset
    with pytest.raises(MissingFileError, match="not a LeRobotDataset"):
        LeRobotDataModule(str(tmp_path), KEYS)
    with pytest.raises(ConfigError, match="observation.images.top"):
        LeRobotDataModule(str(root), {"image": "observation.images.top"})
    old = tmp_path / "old"
    (old / "meta").mkdir(parents=True)
    (old / "meta" / "info.json").write_text(json.dumps({"codebase_version": "v2.1", "features": {}}))
    with pytest.raises(DataError, match="v3.0"):
        LeRobotDataModule(str(old), KEYS)
    with pytest.raises(ConfigError, match="normalizer"):
        LeRobotDataModule(str(root), KEYS, normalizer="meanstd")


def test_nan_demonstrations_are_refused_at_setup_naming_the_folder(tmp_path):
    """The zarr reader refused NaN actions; the LeRobot reader passed them to training (issue 32)."""
    eps = episodes(lengths=(12, 10), seed=3)
    eps[1]["action"][4, 0] = np.nan
    root = write_lerobot(tmp_path / "nan", eps)
    dm = LeRobotDataModule(str(root), {"agent_pos": "observation.state"}, val_fraction=0.0)
    with pytest.raises(DataError, match=rf"{root}: data/action has non-finite values in 1 of 22 rows \(first: row 16"):
        dm.setup("fit")


def test_broken_metadata_names_the_file_or_feature_and_the_fix(dataset, tmp_path):
    import shutil

    root = shutil.copytree(dataset[0], tmp_path / "copy", ignore=shutil.ignore_patterns("videos"))
    info_path = root / "meta" / "info.json"
    good = info_path.read_text()
    info_path.write_text(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"info\.json is not valid JSON .*cut short"):
        LeRobotDataModule(str(root), KEYS)
    info = json.loads(good)
    del info["features"]["observation.state"]["shape"]
    info_path.write_text(json.dumps(info))
    with pytest.raises(DataError, match=r"feature 'observation\.state' has no shape"):
        LeRobotDataModule(str(root), KEYS)
    info_path.write_text(good)
    with pytest.raises(ConfigError, match=r"data\.action_key=actions is not a feature of"):
        LeRobotDataModule(str(root), KEYS, action_key="actions")


def test_train_on_a_lerobot_folder_and_act_without_it(dataset, tmp_path):
    pytest.importorskip("gym_pusht")
    import shutil

    from conftest import run_cli
    from envs.policy import load_policy

    root = shutil.copytree(dataset[0], tmp_path / "copy")
    run_dir = tmp_path / "run"
    run_cli("train.py", "data=lerobot", f"data.root={root}", "obs_encoder=conv_small", "net=unet1d_tiny", "data.batch_size=8",
            "data.val_fraction=0.34", "trainer.max_steps=2", "trainer.val_check_interval=2", "callbacks.rollout.num_episodes=1",
            "callbacks.rollout.max_steps=8", "final_eval.num_episodes=1", f"hydra.run.dir={run_dir}", "logger=csv")
    shutil.rmtree(root)  # a policy needs its checkpoint, not its data
    policy, datamodule = load_policy(run_dir / "checkpoints" / "last.ckpt")
    assert datamodule is None and policy.task == "pusht" and policy.image_shapes == {"image": (3, 96, 96)}
    env = policy.make_env()
    policy.reset()
    obs = env.reset(seed=100000)
    for _ in range(3):
        obs, *_ = env.step(policy.select_action(obs))


def test_images_stored_in_the_parquet_read_exactly(tmp_path):
    """LeRobot's use_videos=False: frames as PNG in the data parquet, video_path null (crashed: 'NoneType' has no
    attribute 'format'). PNG is lossless: the frames come back bit for bit, in training batches too."""
    eps = episodes(lengths=(9, 7, 11), seed=4)
    root = write_lerobot(tmp_path / "images", eps, use_videos=False)
    dm = LeRobotDataModule(str(root), None, val_fraction=0.0, batch_size=4)
    assert dm.env_image_shapes == {"image": (3, 96, 96)}
    frames = dm.images(dm.buffer(), "image")
    written = torch.from_numpy(np.concatenate([e["image"] for e in eps])).permute(0, 3, 1, 2)
    assert torch.equal(frames, written)
    batch = next(iter(dm.train_dataloader()))
    assert batch["cond"]["image"].dtype == torch.uint8 and batch["cond"]["image"].shape == (4, 2, 3, 96, 96)


def test_data_keys_is_replaced_whole_so_a_subset_is_a_subset(dataset, tmp_path):
    """`data.keys={...}` was merged into the default mapping: a new key failed 'not in struct', a subset kept the
    default camera and a state-only run became an image run."""
    from hydra.utils import instantiate

    from test_configs import compose_train

    eps = episodes(lengths=(8, 9), seed=5)
    for e in eps:
        e["env_state"] = np.random.default_rng(1).uniform(0, 512, (len(e["action"]), 18)).astype(np.float32)
    root = write_lerobot(tmp_path / "env_state", eps)
    both = compose_train(["data=lerobot", f"data.root={root}",
                          "data.keys={agent_pos:observation.state,keypoint:observation.environment_state}"], tmp_path)
    assert dict(both.data["keys"]) == {"agent_pos": "observation.state", "keypoint": "observation.environment_state"}
    dm = instantiate(both.data)
    assert dm.obs_keys == ["agent_pos", "keypoint"] and dm.obs_spec is None and dm.obs_dim == 20
    subset = compose_train(["data=lerobot", f"data.root={root}", "data.keys={agent_pos:observation.state}"], tmp_path)
    assert dict(subset.data["keys"]) == {"agent_pos": "observation.state"}
    assert instantiate(subset.data).image_keys == []
    default = instantiate(compose_train(["data=lerobot", f"data.root={dataset[0]}"], tmp_path).data)
    assert default.keys == {"agent_pos": "observation.state", "image": "observation.image"}


def test_a_dataset_without_a_simulator_trains_and_ends_cleanly(dataset, tmp_path):
    """The README's recipe (data.task='') trained, then exited 1 in the final evaluation ('this policy names no
    task'); now the run ends 0 with the closed-loop evaluation skipped and said so."""
    from conftest import run_cli

    run_dir = tmp_path / "run"
    proc = run_cli("train.py", "data=lerobot", f"data.root={dataset[0]}", "data.keys={agent_pos:observation.state}", "data.task=''",
                   "net=unet1d_tiny", "data.batch_size=8", "data.val_fraction=0.34", "trainer.max_steps=2",
                   "trainer.val_check_interval=2", f"hydra.run.dir={run_dir}", "logger=csv")
    metrics = json.loads((run_dir / "final" / "metrics.json").read_text())
    assert metrics["closed_loop"].startswith("skipped (data.task is empty") and metrics["metric"] == "val/loss"
    assert "no closed-loop evaluation" in proc.stdout and (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_final_eval_num_episodes_zero_skips_the_episodes_on_a_task_with_a_simulator(tmp_path):
    from conftest import run_cli

    proc = run_cli("train.py", "data=obstacle2d", "data.num_episodes=8", "data.batch_size=32", "callbacks.rollout=null",
                   "model.num_timesteps=10", "model.sampling.steps=2", "final_eval.num_episodes=0", "trainer.max_steps=2",
                   "trainer.val_check_interval=2", f"hydra.run.dir={tmp_path}", "logger=csv")
    metrics = json.loads((tmp_path / "final" / "metrics.json").read_text())
    assert metrics["closed_loop"] == "skipped (final_eval.num_episodes=0)" and "no closed-loop evaluation" in proc.stdout
