"""Execution strategies and inference delay (envs/execution.py) against a scripted policy with known chunks.

The scripted module (tests/test_runner.py) makes every chunk spell out where it came from: the action for step u of
a chunk planned from the observation of step s is (u, 1000 * call + seed), whatever s is, so the first component
checks alignment and the second which plan (and so which, possibly stale, observation) an executed action came from.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import pytest

from difflab.errors import ConfigError
from difflab.normalizer import MinMaxNormalizer
from envs.execution import Executor
from envs.policy import Policy
from envs.runner import run_episodes
from test_runner import HORIZON, N_OBS, CountingEnv, ScriptedModule, identity

L = HORIZON - N_OBS + 1  # 6 actions per chunk from the current step on


def policy(n_act=4, **execution):
    module = ScriptedModule()
    return Policy(module, MinMaxNormalizer(-np.ones(2), np.ones(2)), identity(), ["pos"], {"pos": 2}, N_OBS, HORIZON, n_act,
                  **execution), module


def rollout(seeds, **kw):
    pol, module = policy(**kw)
    envs = []

    def make_env():
        envs.append(CountingEnv())
        return envs[-1]

    return run_episodes(pol, make_env, seeds), envs, module


def test_temporal_ensembling_averages_the_covering_chunks_oldest_weighted_most():
    ex = Executor("temporal_ensemble", n_action_steps=1, chunk_length=3, m=0.5)
    ex.reset(1)
    values = [10.0, 20.0, 30.0]
    for step, v in enumerate(values):
        assert ex.due(step)
        ex.add(0, step, np.full((3, 1), v))
        got = ex.action(0, step)[0]
        live = values[: step + 1]
        w = [math.exp(-0.5 * i) for i in range(len(live))]  # i = 0: the oldest chunk
        assert got == pytest.approx(sum(wi * v for wi, v in zip(w, live)) / sum(w))
    ex.add(0, 3, np.full((3, 1), 40.0))  # the chunk of step 0 no longer covers step 3
    w = [math.exp(-0.5 * i) for i in range(3)]
    assert ex.action(0, 3)[0] == pytest.approx((w[0] * 20 + w[1] * 30 + w[2] * 40) / sum(w))


@pytest.mark.parametrize("n_act,delay", [(4, 2), (2, 3), (1, 1)])
def test_with_delay_the_env_executes_the_previous_chunk_until_the_stale_plan_arrives(n_act, delay):
    results, envs, module = rollout([0], n_act=n_act, inference_delay=delay)
    actions = np.stack(envs[0].actions)
    np.testing.assert_array_equal(actions[:, 0], np.arange(len(actions)))  # every action for its own step
    calls = (actions[:, 1] // 1000).astype(int)
    planned_at = [int(c.reshape(N_OBS, 2)[-1, 0]) for c in module.calls]  # the observation each plan saw
    # the first chunk runs until the second arrives; each later chunk runs n_act steps from its arrival
    assert planned_at[0] == 0 and all((s + delay) % n_act == 0 for s in planned_at[1:])
    assert np.all(np.diff(planned_at[1:]) == n_act) and planned_at[1] == min(s for s in range(1, 50) if (s + delay) % n_act == 0)
    for u, call in enumerate(calls):
        arrival = max(k for k, s in enumerate(planned_at) if (s + delay if k else 0) <= u)
        assert call == arrival + 1, (u, call, arrival)


@pytest.mark.parametrize("execution", [{}, {"inference_delay": 2}, {"execution": "temporal_ensemble", "ensemble_m": 0.1},
                                       {"execution": "temporal_ensemble", "inference_delay": 1, "n_act": 1}])
def test_select_action_and_the_runner_execute_the_same_actions(execution):
    execution = dict(execution)
    n_act = execution.pop("n_act", 4)
    _, envs, _ = rollout([3], n_act=n_act, **execution)
    pol, _ = policy(n_act=n_act, **execution)
    env = CountingEnv()
    obs, done, stepped = env.reset(3), False, []
    while not done:
        action = pol.select_action(obs)
        stepped.append(action)
        obs, _, done, _ = env.step(action)
    np.testing.assert_allclose(np.stack(stepped), np.stack(envs[0].actions), rtol=0, atol=0)


def test_smoothness_figures():
    ex = Executor("receding", n_action_steps=2, chunk_length=4)
    ex.reset(1)
    t = np.arange(8, dtype=np.float64)
    for step in range(8):
        if ex.due(step):
            ex.add(0, step, (np.arange(step, step + 4, dtype=np.float64) ** 3)[:, None])
        ex.action(0, step)
    figures = ex.smoothness(0)
    assert figures["jerk"] == pytest.approx(36.0)  # the third difference of t^3 is 6 everywhere
    jumps = [abs(t[s] ** 3 - t[s - 1] ** 3) for s in (2, 4, 6)]  # new chunks took over at steps 2, 4, 6
    assert figures["boundary_jump"] == pytest.approx(np.mean(jumps))


@pytest.mark.parametrize("kwargs, match", [
    ({"execution": "ensemble"}, r"execution='ensemble' is not a strategy: use one of receding, temporal_ensemble"),
    ({"inference_delay": -1}, r"inference_delay=-1 is not valid"),
    ({"inference_delay": 3}, r"inference_delay=3 with 4 action\(s\) executed per plan needs 7 actions of each chunk, but "
                             r"the policy's chunk has 6 .*: lower inference_delay to at most 2 or n_action_steps"),
    ({"execution": "temporal_ensemble", "ensemble_m": -0.1}, r"ensemble_m=-0.1 is not valid"),
])
def test_bad_execution_settings_are_one_line(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        policy(**kwargs)


def test_bid_picks_the_candidate_with_the_least_coherence_plus_contrast_loss():
    ex = Executor("bid", n_action_steps=2, chunk_length=3, samples=3, decay=0.5, weak=True)
    ex.reset(1)
    ex.add(0, 0, np.array([[0.0], [1.0], [2.0]]))  # the previous decision: steps 0, 1, 2
    ex.action(0, 0), ex.action(0, 1)
    candidates = np.array([[[1.9], [5.0], [5.0]], [[2.0], [3.0], [4.0]], [[0.0], [3.0], [4.0]]])
    weak = np.array([[[1.9], [5.0], [5.0]]] * 3)  # the weak policy agrees with candidate 0: contrast pushes away from it

    def by_hand(c):
        backward = (c[0, 0] - 2.0) ** 2  # step 2 is the one both plan (rho^0)
        contrast = np.mean([((c - d) ** 2).sum() for d in candidates if not np.array_equal(d, c)]) - np.mean(
            [((c - w) ** 2).sum() for w in weak])
        return backward + contrast

    want = int(np.argmin([by_hand(c) for c in candidates]))
    assert ex.bid_pick(0, 2, candidates, weak) == want == 1
    # with nothing planned before (the episode's first plan) coherence drops out, and candidate 2 wins
    ex.reset(1)
    assert ex.bid_pick(0, 0, candidates, weak) == int(np.argmin([by_hand(c) - (c[0, 0] - 2.0) ** 2 for c in candidates])) == 2


class NoisyModule(ScriptedModule):
    """The scripted chunk plus the generator's noise, so repeated rows give distinct candidates."""

    def sample(self, num_samples, cond=None, sampler=None, steps=None, generator=None):
        base = super().sample(num_samples, cond)
        return base + torch.randn(base.shape, generator=generator)


def test_bid_executes_the_same_actions_in_the_runner_and_select_action():
    def make(seed):
        weak = Policy(NoisyModule(), MinMaxNormalizer(-np.ones(2), np.ones(2)), identity(), ["pos"], {"pos": 2}, N_OBS, HORIZON, 4, seed=7)
        return Policy(NoisyModule(), MinMaxNormalizer(-np.ones(2), np.ones(2)), identity(), ["pos"], {"pos": 2}, N_OBS, HORIZON, 4,
                      seed=seed, execution="bid", bid_samples=4, bid_weak=weak)

    env = CountingEnv()
    pol = make(1)
    run_episodes(pol, lambda: env, [2])
    executed = np.stack(env.actions)
    pol, env2 = make(1), CountingEnv()
    obs, done, stepped = env2.reset(2), False, []
    while not done:
        stepped.append(pol.select_action(obs))
        obs, _, done, _ = env2.step(stepped[-1])
    np.testing.assert_array_equal(np.stack(stepped), executed)
    assert len(pol.module.calls) == 3 and pol.module.calls[0].shape[0] == 4  # 4 candidates a plan, 12 steps


def test_bid_without_a_weak_policy_is_refused():
    with pytest.raises(ConfigError, match=r"execution=bid needs .* pass bid_weak_ckpt=PATH"):
        policy(execution="bid")


def test_rtc_weights_and_the_inpainting_pull_in_closed_form():
    from samplers.inpainting import Inpainted, rtc_weights

    w = rtc_weights(6, delay=2, overlap=4)
    c = [2 / 3, 1 / 3]
    want = [1.0, 1.0, *(x * (math.exp(x) - 1) / (math.e - 1) for x in c), 0.0, 0.0]
    np.testing.assert_allclose(w.numpy(), want, rtol=1e-12)
    # a linear denoiser D = a x + b: its Jacobian is a, so D' = D + sigma min(beta, (1 + sigma^2) / sigma) a W (Y - D)
    a, b = 0.7, torch.tensor([0.3, -0.2], dtype=torch.float64)
    x = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    target = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    weights = torch.tensor([1.0, 0.5, 0.2, 0.0], dtype=torch.float64)[None, :, None].expand(3, 4, 1)
    sigma = torch.tensor([0.05, 1.0, 30.0], dtype=torch.float64)
    guided = Inpainted(lambda v, s: a * v + b, target, weights, max_guidance=5.0)(x, sigma)
    d = a * x + b
    scale = sigma * torch.minimum(torch.full_like(sigma, 5.0), (1 + sigma**2) / sigma)
    torch.testing.assert_close(guided, d + scale[:, None, None] * a * weights * (target - d))
    torch.testing.assert_close(Inpainted(lambda v, s: a * v + b, target, weights)(x, torch.zeros(3, dtype=torch.float64)), d)


class RecordingModule(ScriptedModule):
    provides = "denoiser"

    def __init__(self):
        super().__init__()
        self.options = []

    def sample(self, num_samples, cond=None, sampler=None, steps=None, generator=None, **options):
        self.options.append(options)
        return super().sample(num_samples, cond)


def test_rtc_inpaints_toward_the_previous_chunks_tail_in_model_coordinates():
    pol = Policy(RecordingModule(), MinMaxNormalizer(-np.ones(2), np.ones(2)), MinMaxNormalizer(-np.full(2, 100.0), np.full(2, 100.0)),
                 ["pos"], {"pos": 2}, N_OBS, HORIZON, 4, execution="rtc", inference_delay=1, rtc_max_guidance=3.0)
    env = CountingEnv()
    run_episodes(pol, lambda: env, [0])
    first, second = pol.module.options[0], pol.module.options[1]
    assert "inpaint" not in first  # nothing to inpaint toward at an episode's first plan
    target, weights = second["inpaint"]
    assert second["rtc_max_guidance"] == 3.0
    # the second plan is at step 3 (arrives at 4); the first chunk planned steps 0..5 (L = 6): it shares steps 3, 4, 5
    start = N_OBS - 1
    # the script's chunk (step, 1000 * call + seed) is the model's normalized output; the env got it unnormalized
    first_chunk_tail = torch.tensor([[3.0, 1000.0], [4.0, 1000.0], [5.0, 1000.0]])
    torch.testing.assert_close(target[0, start : start + 3], first_chunk_tail)
    np.testing.assert_allclose(np.stack(env.actions[:3]), 100 * np.array([[0, 1000], [1, 1000], [2, 1000]]))
    from samplers.inpainting import rtc_weights

    torch.testing.assert_close(weights[0, start:, 0], rtc_weights(L, 1, 3).float())
    assert (weights[0, :start] == 0).all() and (target[0, :start] == 0).all()


def test_rtc_on_a_policy_without_a_denoiser_is_refused():
    module = ScriptedModule()
    module.provides = "direct"
    with pytest.raises(ConfigError, match="execution=rtc inpaints through a denoiser's Jacobian; a ScriptedModule has none"):
        Policy(module, MinMaxNormalizer(-np.ones(2), np.ones(2)), identity(), ["pos"], {"pos": 2}, N_OBS, HORIZON, 4, execution="rtc")


def test_the_disturbed_pusht_pushes_the_block_and_repeats_with_the_seed():
    pytest.importorskip("gym_pusht")
    from envs import make_env

    def run(p):
        env = make_env("pusht", perturb=p)
        obs = env.reset(seed=3)
        hold = obs["agent_pos"].copy()  # the agent holds still, so only pushes move the block
        states, pushes = [], 0
        for _ in range(20):
            obs, _, _, info = env.step(hold)
            states.append(obs["state"][2:5])
            pushes += info["pushed"]
        env.close()
        return np.array(states), pushes

    still, none = run(0.0)
    moved, pushes = run(0.5)
    again, _ = run(0.5)
    assert none == 0 and np.abs(still - still[0]).max() < 1e-3
    assert pushes >= 5 and np.abs(moved - still).max() > 5.0 and np.array_equal(moved, again)
    with pytest.raises(ConfigError, match=r"the obstacle2d environment has no setting perturb="):
        make_env("obstacle2d", perturb=0.1)
    with pytest.raises(ConfigError, match=r"perturb=1.5 is the chance per step"):
        make_env("pusht", perturb=1.5)
