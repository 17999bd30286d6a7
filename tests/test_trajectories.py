"""Replay buffer, windowing with edge padding, normalizer, and the trajectory datamodules."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from difflab.normalizer import MinMaxNormalizer
from datamodules.pusht import PushTDataModule
from datamodules.replay_buffer import ReplayBuffer, split_episodes, window_indices
from datamodules.trajectories import TrajectoryDataModule
from difflab.errors import DataError

PUSHT_ZARR = os.environ.get("PUSHT_ZARR")
needs_pusht = pytest.mark.skipif(not PUSHT_ZARR or not Path(PUSHT_ZARR).exists(), reason="set PUSHT_ZARR to pusht_cchi_v7_replay.zarr")


def test_windows_pad_by_repeating_the_episode_edges():
    ends = np.array([3, 5])  # episodes of 3 and 2 steps
    idx = window_indices(ends, np.array([0, 1]), length=4, pad_before=1, pad_after=2)
    expected = [[0, 0, 1, 2], [0, 1, 2, 2], [1, 2, 2, 2], [3, 3, 4, 4], [3, 4, 4, 4]]
    np.testing.assert_array_equal(idx, expected)


def test_window_count_and_no_crossing_between_episodes():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 40, size=12)
    ends = np.cumsum(lengths)
    idx = window_indices(ends, np.arange(12), length=16, pad_before=1, pad_after=7)
    per_episode = np.maximum(lengths - 16 + 1 + 1 + 7, 0)
    assert len(idx) == per_episode.sum()
    episode_of = np.searchsorted(ends, idx, side="right")
    assert (episode_of == episode_of[:, :1]).all()
    # consecutive steps inside a window advance by one or repeat an edge, never jump
    assert set(np.unique(np.diff(idx, axis=1))) <= {0, 1}


def test_split_is_by_episode_and_seeded():
    train, val = split_episodes(100, 0.1, seed=3)
    assert len(val) == 10 and len(train) == 90 and not set(train) & set(val)
    np.testing.assert_array_equal(val, split_episodes(100, 0.1, seed=3)[1])
    assert not np.array_equal(val, split_episodes(100, 0.1, seed=4)[1])


def test_replay_buffer_round_trips_through_zarr_v2(tmp_path):
    episodes = [{"state": np.random.rand(n, 5).astype(np.float32), "action": np.random.rand(n, 2).astype(np.float32)} for n in (4, 7, 3)]
    buffer = ReplayBuffer.from_episodes(episodes)
    path = buffer.save(tmp_path / "demo.zarr")
    assert (path / "data" / "state" / ".zarray").exists()  # v2 layout, readable by Diffusion Policy's code
    loaded = ReplayBuffer.load(path)
    np.testing.assert_array_equal(loaded.episode_ends, [4, 11, 14])
    np.testing.assert_array_equal(loaded.episode(1)["state"], episodes[1]["state"])
    assert sorted(loaded.data) == ["action", "state"]


def test_replay_buffer_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.zarr.*get it here"):
        ReplayBuffer.load(tmp_path / "nowhere.zarr", hint="get it here")
    ReplayBuffer.from_episodes([{"state": np.zeros((3, 5)), "action": np.zeros((3, 2))}]).save(tmp_path / "b.zarr")
    with pytest.raises(DataError, match=r"no data/keypoint; its keys are \['action', 'state'\]"):
        ReplayBuffer.load(tmp_path / "b.zarr", ["keypoint", "action"])
    with pytest.raises(ValueError, match="episode_ends"):
        ReplayBuffer({"a": np.zeros(5)}, np.array([3, 2]))


def test_normalizer_maps_the_range_to_unit_interval_and_back():
    x = np.random.default_rng(0).normal(size=(500, 3)) * [1.0, 100.0, 0.0] + [0.0, 50.0, 7.0]
    norm = MinMaxNormalizer.fit(x)
    y = norm.normalize(x)
    np.testing.assert_allclose(y[:, :2].min(0), -1.0, atol=1e-6)
    np.testing.assert_allclose(y[:, :2].max(0), 1.0, atol=1e-6)
    np.testing.assert_allclose(y[:, 2], 0.0, atol=1e-6)  # a constant dimension is centred, not divided by zero
    np.testing.assert_allclose(norm.unnormalize(y), x, rtol=1e-5, atol=1e-4)
    restored = MinMaxNormalizer.from_state_dict(norm.state_dict())
    torch.testing.assert_close(restored.normalize(torch.tensor(x, dtype=torch.float32)), torch.tensor(y, dtype=torch.float32))


class CountingTask(TrajectoryDataModule):
    """obs at step t of an episode is (t, 10 * episode); the action taken there is t + 0.5: alignment is checkable."""

    env_obs_dims = {"pos": 2}

    def __init__(self, **kwargs):
        super().__init__(obs_keys=["pos"], **kwargs)

    def load_buffer(self):
        episodes = []
        for e, n in enumerate([20, 25, 30, 22]):
            t = np.arange(n, dtype=np.float32)
            episodes.append({"pos": np.stack([t, np.full(n, 10.0 * e)], 1), "action": np.stack([t + 0.5, t + 0.5], 1)})
        return ReplayBuffer.from_episodes(episodes)


def test_trajectory_batches_align_history_with_the_chunk():
    dm = CountingTask(n_obs_steps=2, horizon=8, n_action_steps=4, val_fraction=0.25, batch_size=4)
    dm.setup()
    assert dm.data_shape == (8, 2) and dm.cond_dim == 4
    batch = dm.dataset("train")[torch.arange(len(dm.dataset("train")))]
    x = dm.action_normalizer.unnormalize(batch["x"])
    obs = dm.obs_normalizer.unnormalize(batch["cond"].reshape(-1, 2, 2))
    assert batch["x"].abs().max() <= 1.0 + 1e-6 and batch["cond"].abs().max() <= 1.0 + 1e-6
    # the action at chunk index n_obs_steps-1 is the one taken at the newest observation
    current_t = obs[:, -1, 0]
    np.testing.assert_allclose(x[:, 1, 0], current_t + 0.5, atol=1e-4)
    # the history starts padded: some windows repeat the first observation
    assert (obs[:, 0, 0] == obs[:, 1, 0]).any()
    # normalizers are fit on the train episodes only (the second obs entry is 10 * episode id)
    train = dm._episodes["train"]
    assert dm.obs_normalizer.low[1] == 10.0 * train.min() and dm.obs_normalizer.high[1] == 10.0 * train.max()
    assert len(dm._episodes["val"]) == 1 and dm._episodes["val"][0] not in train


def test_max_train_episodes_keeps_a_seeded_subset_of_the_training_episodes_only():
    full = CountingTask(n_obs_steps=2, horizon=8, n_action_steps=4, val_fraction=0.25)
    full.setup()
    assert len(full._episodes["train"]) == 3
    few = CountingTask(n_obs_steps=2, horizon=8, n_action_steps=4, val_fraction=0.25, max_train_episodes=2)
    few.setup()
    train, val = few._episodes["train"], few._episodes["val"]
    assert len(train) == 2 and set(train) < set(full._episodes["train"]) and np.array_equal(val, full._episodes["val"])
    again = CountingTask(n_obs_steps=2, horizon=8, n_action_steps=4, val_fraction=0.25, max_train_episodes=2)
    again.setup()
    assert np.array_equal(again._episodes["train"], train)
    # the batches come from those episodes only (obs entry 1 is 10 * episode id), and so do the normalizers
    episodes = set((few.obs_normalizer.unnormalize(few.dataset("train")[:]["cond"].reshape(-1, 2, 2))[:, 0, 1] / 10).round().int().tolist())
    assert episodes == set(train.tolist())
    assert few.obs_normalizer.high[1] == 10.0 * train.max()
    # more than there are: all of them
    many = CountingTask(n_obs_steps=2, horizon=8, n_action_steps=4, val_fraction=0.25, max_train_episodes=50)
    many.setup()
    assert np.array_equal(many._episodes["train"], full._episodes["train"])
    with pytest.raises(ValueError, match="data.max_train_episodes"):
        CountingTask(max_train_episodes=0)


def test_trajectory_state_survives_a_weights_only_checkpoint(tmp_path):
    dm = CountingTask(n_obs_steps=2, horizon=8, n_action_steps=4)
    dm.setup()
    torch.save({"dm": dm.state_dict()}, tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)["dm"]
    fresh = CountingTask(n_obs_steps=2, horizon=8, n_action_steps=4)
    fresh.load_state_dict(state)
    x = torch.randn(5, 2)
    torch.testing.assert_close(fresh.obs_normalizer.normalize(x), dm.obs_normalizer.normalize(x))
    other = CountingTask(n_obs_steps=1, horizon=8, n_action_steps=4)
    with pytest.raises(ValueError, match="n_obs_steps"):
        other.load_state_dict(state)


def test_trajectory_settings_are_checked():
    with pytest.raises(ValueError, match="unknown \\['velocity'\\]"):
        PushTDataModule(path="x.zarr", obs_keys=["velocity"])
    with pytest.raises(ValueError, match="n_action_steps"):
        CountingTask(n_obs_steps=2, horizon=8, n_action_steps=8)


def test_missing_pusht_zarr_says_where_to_get_it(tmp_path):
    dm = PushTDataModule(path=str(tmp_path / "pusht_cchi_v7_replay.zarr"))
    with pytest.raises(FileNotFoundError, match="pusht_cchi_v7_replay.zarr.*pusht.zip"):
        dm.setup()


def test_pusht_zarr_without_the_key_lists_what_it_has(tmp_path):
    n = 20
    ReplayBuffer.from_episodes([{"state": np.zeros((n, 5), np.float32), "action": np.zeros((n, 2), np.float32)}]).save(tmp_path / "p.zarr")
    with pytest.raises(DataError, match=r"keypoint.*\['action', 'state'\]"):
        PushTDataModule(path=str(tmp_path / "p.zarr"), obs_keys=["keypoint", "agent_pos"]).setup()
    dm = PushTDataModule(path=str(tmp_path / "p.zarr"), obs_keys=["state"], val_fraction=0.0)
    assert dm.cond_dim == 10
    dm.fit_normalizers()


@needs_pusht
def test_real_pusht_windows():
    dm = PushTDataModule(path=PUSHT_ZARR)
    dm.setup()
    buffer = dm.buffer()
    assert buffer.num_episodes == 206 and buffer.num_steps == 25650
    train = dm.dataset("train")
    assert dm.data_shape == (16, 2) and dm.cond_dim == 40
    expected = sum(max(buffer.episode_ends[i] - buffer.episode_starts[i] - 16 + 1 + 1 + 7, 0) for i in dm._episodes["train"])
    assert len(train) == expected
    batch = train[torch.arange(0, len(train), 97)]
    assert batch["x"].abs().max() <= 1.0 + 1e-6
    # agent_pos (the last 2 of each step's 20) is the first two entries of state
    raw = dm.obs_normalizer.unnormalize(batch["cond"].reshape(-1, 2, 20))
    assert ((raw[..., 18:] >= 0) & (raw[..., 18:] <= 512)).all()
