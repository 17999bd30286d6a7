"""Obstacle2D: the expert's routes, why averaging them fails, and the environment's contract."""

import numpy as np
import pytest

from envs.obstacle2d import (
    GOAL_CENTER,
    GOAL_RADIUS,
    MAX_SPEED,
    OBSTACLE_RADIUS,
    START_CENTER,
    START_HALF_SIZE,
    WORLD_HALF,
    Obstacle2DEnv,
    ScriptedExpert,
    advance,
    generate_demos,
    segment_disc_entry,
)


def run_episode(env, seed, act):
    obs = env.reset(seed=seed)
    info = {}
    for _ in range(env.max_steps):
        obs, reward, done, info = env.step(act(obs))
        if done:
            break
    return info


def test_expert_succeeds_and_takes_both_routes():
    env = Obstacle2DEnv()
    rng = np.random.default_rng(0)
    successes, collisions, rights = 0, 0, 0
    for seed in range(100):
        expert = ScriptedExpert(rng)
        info = run_episode(env, seed, expert.act)
        successes += info["is_success"]
        collisions += info["collision"]
        rights += expert.side == 1
        if info["is_success"]:
            assert info["route"] == expert.side, "the route reported must be the side the expert chose"
    assert successes >= 98 and collisions == 0
    # Route ~ Binomial(100, 1/2): outside [35, 65] has probability ~0.35% for a fair coin (and the seed is fixed).
    assert 35 <= rights <= 65


def test_the_average_of_the_two_routes_drives_into_the_obstacle():
    """What the diffusion-policy demo relies on: the MSE-optimal (mean) action is not a route."""
    env = Obstacle2DEnv()
    left = ScriptedExpert(np.random.default_rng(0), noise=0.0, side=-1)
    right = ScriptedExpert(np.random.default_rng(0), noise=0.0, side=1)
    collisions = sum(run_episode(env, seed, lambda o: (left.act(o) + right.act(o)) / 2)["collision"] for seed in range(100))
    assert collisions >= 90


def test_reset_is_seeded_and_starts_in_the_symmetric_box():
    env = Obstacle2DEnv()
    starts = np.stack([env.reset(seed=s)["agent_pos"] for s in range(200)])
    assert starts.dtype == np.float32 and starts.shape == (200, 2)
    np.testing.assert_array_equal(env.reset(seed=7)["agent_pos"], starts[7])
    assert len(np.unique(starts, axis=0)) == 200
    assert np.all(np.abs(starts - START_CENTER) <= START_HALF_SIZE + 1e-6)
    # Both halves of the box are used, so neither route is favoured by the start.
    assert 0.35 < np.mean(starts[:, 0] > 0) < 0.65


def test_a_step_that_would_jump_over_the_obstacle_stops_at_it():
    env = Obstacle2DEnv(max_speed=5.0)  # one step could cross the whole disc
    start = env.reset(seed=0)["agent_pos"]
    obs, reward, done, info = env.step(np.array([start[0], 1.2]))
    assert info["collision"] and done and reward == 0.0 and not info["is_success"]
    pos = obs["agent_pos"].astype(np.float64)
    assert np.hypot(*pos) == pytest.approx(OBSTACLE_RADIUS, abs=1e-6) and pos[1] < 0
    assert pos[0] == pytest.approx(start[0], abs=1e-6)
    with pytest.raises(RuntimeError):
        env.step(np.zeros(2))


def test_a_step_that_clips_the_disc_collides_although_both_ends_are_outside():
    p0, p1 = np.array([0.349, -0.03]), np.array([0.349, 0.03])
    assert np.hypot(*p0) > OBSTACLE_RADIUS and np.hypot(*p1) > OBSTACLE_RADIUS
    new, collided = advance(p0, p1)
    assert collided and new[1] < 0
    env = Obstacle2DEnv()
    env.reset(seed=0, state=p0)
    assert env.step(p1)[3]["collision"]
    # A segment that passes just outside the disc is free.
    assert segment_disc_entry(np.array([0.36, -1.0]), np.array([0.36, 1.0]), np.zeros(2), OBSTACLE_RADIUS) is None
    assert segment_disc_entry(np.array([0.0, -1.0]), np.array([0.0, 1.0]), np.zeros(2), OBSTACLE_RADIUS) == pytest.approx(0.65 / 2)


def test_dynamics_speed_limit_and_world_box():
    env = Obstacle2DEnv()
    start = env.reset(seed=3)["agent_pos"].astype(np.float64)
    obs, reward, done, info = env.step(start + np.array([1.0, 0.0]))
    assert np.hypot(*(obs["agent_pos"] - start)) == pytest.approx(MAX_SPEED, abs=1e-6)
    assert (reward, done) == (0.0, False) and info == {"is_success": False, "collision": False, "route": 0}
    near = obs["agent_pos"] + np.array([0.01, 0.02], dtype=np.float32)
    np.testing.assert_allclose(env.step(near)[0]["agent_pos"], near, atol=1e-6)  # a close target is reached
    env.reset(seed=0, state=np.array([1.46, 1.46]))
    np.testing.assert_allclose(env.step(np.array([9.0, 9.0]))[0]["agent_pos"], [WORLD_HALF, WORLD_HALF], atol=1e-6)
    with pytest.raises(ValueError):
        env.step(np.array([np.nan, 0.0]))


def test_success_and_route_semantics():
    env = Obstacle2DEnv()
    env.reset(seed=0, state=GOAL_CENTER - [0.0, GOAL_RADIUS + 0.05])
    obs, reward, done, info = env.step(GOAL_CENTER)
    assert (reward, done, info["is_success"], info["collision"]) == (1.0, True, True, False)
    for side in (-1, 1):
        env.reset(seed=0, state=np.array([side * 0.6, -0.05]))
        assert env.step(np.array([side * 0.6, 0.05]))[3]["route"] == side
        assert env.step(np.array([side * 0.6, 0.2]))[3]["route"] == side  # kept once decided


def test_render_shape_dtype_and_content():
    env = Obstacle2DEnv(render_size=64)
    obs = env.reset(seed=0)
    first = env.render()
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    r, g, b = first[32, 32].astype(int)  # world origin: the obstacle
    assert r > g + 50 and r > b + 50
    gx, gy = 32, round((WORLD_HALF - GOAL_CENTER[1]) / (2 * WORLD_HALF) * 64)
    r, g, b = first[gy, gx].astype(int)
    assert g > r + 50 and g > b + 50
    for _ in range(5):
        obs = env.step(obs["agent_pos"] + np.array([0.3, 0.0]))[0]
    assert not np.array_equal(env.render(), first)  # the path and robot moved
    default = Obstacle2DEnv()
    default.reset(seed=0)
    assert default.render().shape == (96, 96, 3)


def test_generate_demos_shapes_determinism_and_dynamics():
    episodes = generate_demos(20, seed=1)
    assert len(episodes) == 20
    sides = []
    for ep in episodes:
        assert set(ep) == {"agent_pos", "action"}
        obs, act = ep["agent_pos"], ep["action"]
        assert obs.dtype == act.dtype == np.float32 and obs.ndim == act.ndim == 2 and obs.shape == act.shape and obs.shape[1] == 2
        assert np.all(np.abs(obs[0] - START_CENTER) <= START_HALF_SIZE + 1e-6)
        # observation t+1 is the dynamics applied to (observation t, action t), exactly
        for t in range(len(obs) - 1):
            new, collided = advance(obs[t], act[t])
            assert not collided
            np.testing.assert_array_equal(new, obs[t + 1])
        final, _ = advance(obs[-1], act[-1])
        assert np.hypot(*(final - GOAL_CENTER)) <= GOAL_RADIUS
        assert len(obs) < Obstacle2DEnv.max_steps
        sides.append(int(np.sign(obs[np.argmin(np.abs(obs[:, 1])), 0])))
    assert sorted(sides) == [-1] * 10 + [1] * 10  # balanced by construction
    again = generate_demos(20, seed=1)
    for a, b in zip(episodes, again):
        np.testing.assert_array_equal(a["agent_pos"], b["agent_pos"])
        np.testing.assert_array_equal(a["action"], b["action"])
