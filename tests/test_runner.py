"""The closed-loop runner's receding horizon, seen from the environment: with several observation steps and
action steps, each env receives, in order, actions n_obs_steps - 1 .. n_obs_steps + n_action_steps - 2 of every
chunk; each chunk is predicted from the last n_obs_steps observations (oldest first, the first one repeated at
the start); episodes that end drop out of the batch while the others go on; max_steps cuts every episode."""

from __future__ import annotations

import numpy as np
import torch

from difflab.normalizer import MinMaxNormalizer
from envs.policy import Policy
from envs.runner import run_episodes, summarize

N_OBS, HORIZON, N_ACT = 3, 8, 4


class CountingEnv:
    """obs = {'pos': [t, seed]}; the episode ends after `10 + seed` steps; it records every action it gets."""

    obs_dims = {"pos": 2}
    action_dim = 2
    max_steps = 50

    def reset(self, seed: int):
        self.seed, self.t, self.actions = seed, 0, []
        return {"pos": np.array([0.0, seed], dtype=np.float32)}

    def step(self, action):
        self.actions.append(np.asarray(action).copy())
        self.t += 1
        done = self.t >= 10 + self.seed
        return {"pos": np.array([self.t, self.seed], dtype=np.float32)}, float(self.t) / 100, done, {"is_success": done}

    def render(self):
        return np.zeros((4, 4, 3), np.uint8)

    def close(self):
        pass


class ScriptedModule(torch.nn.Module):
    """A 'sampler' whose chunk spells out what it was conditioned on: action k of a chunk predicted from the
    history whose last observation is (t, seed) is (t + k - (N_OBS - 1), 1000 * call + seed)."""

    def __init__(self):
        super().__init__()
        self.calls: list[torch.Tensor] = []
        self.device = torch.device("cpu")

    def sample(self, num_samples, cond=None, sampler=None, steps=None, generator=None):
        self.calls.append(cond.clone())
        last = cond.reshape(num_samples, N_OBS, 2)[:, -1]  # identity normalizer: raw (t, seed)
        k = torch.arange(HORIZON, dtype=torch.float32)
        t = last[:, :1] + k[None] - (N_OBS - 1)
        tag = torch.full_like(t, 1000.0 * len(self.calls)) + last[:, 1:]
        return torch.stack([t, tag], dim=-1)

    def nfe(self, sampler=None, steps=None):
        return 1


def identity() -> MinMaxNormalizer:
    return MinMaxNormalizer(-np.ones(2), np.ones(2))


def run(seeds, max_steps=None):
    module = ScriptedModule()
    policy = Policy(module, MinMaxNormalizer(-np.ones(2), np.ones(2)), identity(), ["pos"], {"pos": 2}, N_OBS, HORIZON, N_ACT)
    envs = []

    def make_env():
        envs.append(CountingEnv())
        return envs[-1]

    results = run_episodes(policy, make_env, seeds, max_steps=max_steps)
    return results, envs, module


def test_each_env_gets_the_chunks_actions_in_order_from_the_current_step():
    results, envs, module = run([0, 3, 5])
    for env, r in zip(envs, results):
        actions = np.stack(env.actions)
        # the action taken at step t is the chunk's action for step t: (t, ...) by the script
        np.testing.assert_array_equal(actions[:, 0], np.arange(len(actions)))
        # a new chunk every N_ACT steps: the call index in the tag advances every 4 actions
        calls = (actions[:, 1] // 1000).astype(int)
        assert all((calls[i] == calls[i - 1]) == (i % N_ACT != 0) for i in range(1, len(calls)))
        assert (actions[:, 1] % 1000 == env.seed).all()
        assert r["length"] == 10 + env.seed and r["success"] and r["max_reward"] == r["length"] / 100


def test_histories_are_the_last_observations_oldest_first_padded_at_the_start():
    _, _, module = run([2])
    first = module.calls[0].reshape(N_OBS, 2)
    np.testing.assert_array_equal(first.numpy(), [[0, 2]] * N_OBS)  # the first observation repeated
    second = module.calls[1].reshape(N_OBS, 2)
    np.testing.assert_array_equal(second[:, 0].numpy(), [N_ACT - 2, N_ACT - 1, N_ACT])


def test_finished_episodes_leave_the_batch_and_max_steps_cuts_the_rest():
    results, envs, module = run([0, 6])  # episodes of 10 and 16 steps
    sizes = [c.shape[0] for c in module.calls]
    assert sizes == [2, 2, 2, 1]  # 3 chunks cover 12 >= 10 steps; 16 steps need 4 chunks
    assert [len(e.actions) for e in envs] == [10, 16]
    cut, envs_cut, _ = run([0, 6], max_steps=7)
    assert [r["length"] for r in cut] == [7, 7] and [len(e.actions) for e in envs_cut] == [7, 7]
    assert not any(r["success"] for r in cut)
    scores = summarize(results)
    assert scores["num_episodes"] == 2 and scores["mean_length"] == 13 and scores["success_rate"] == 1.0


def test_route_shares_count_successful_episodes_only():
    ep = lambda success, route: {"max_reward": float(success), "success": success, "length": 5, "route": route}
    out = summarize([ep(True, -1), ep(True, -1), ep(True, 1), ep(False, 1), ep(False, 1)])
    assert out["route_left"] == 2 / 3 and out["route_right"] == 1 / 3 and out["success_rate"] == 0.6
    none = summarize([ep(False, -1), ep(False, 1)])
    assert none["route_left"] == 0.0 and none["route_right"] == 0.0
    assert "route_left" not in summarize([{"max_reward": 0.0, "success": False, "length": 3}])
