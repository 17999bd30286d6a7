"""Closed-loop evaluation: N seeded episodes, the policy's execution strategy (receding horizon by default), the
paper's scores and the executed actions' smoothness.

All episodes step in lockstep so the policy samples one batch of action chunks
for every running episode at once (one network call per denoising step, not
one per episode). When to plan and what to execute is `envs.execution`'s, the same
code `Policy.select_action` steps with. Used by the rollout callback, `train.py`'s
final evaluation and `evaluate.py metric=policy`.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from envs.execution import Executor

SUCCESS_NOTE = "success: the environment's own criterion (Push-T: coverage > 0.95; obstacle2d: goal reached)"


def run_episodes(policy, make_env: Callable, seeds: list[int], max_steps: int | None = None, render_episodes: int = 0,
                 progress: bool = False) -> list[dict]:
    """One dict per seed: max_reward, success, length, frames (first `render_episodes` episodes) and route if the env reports one."""
    envs = [make_env() for _ in seeds]
    policy.check_env(envs[0])
    max_steps = max_steps or envs[0].max_steps
    n = len(seeds)
    histories, results = [], []
    for env, seed in zip(envs, seeds):
        obs = env.reset(seed=int(seed))
        # At an episode start the history is the first observation repeated, as in training's edge padding.
        histories.append(deque([obs] * policy.n_obs_steps, maxlen=policy.n_obs_steps))
        results.append({"seed": int(seed), "max_reward": 0.0, "success": False, "length": 0, "done": False, "frames": []})
    for i in range(min(render_episodes, n)):
        results[i]["frames"].append(envs[i].render())

    # A Policy brings its execution strategy; anything else with stack/act runs receding on the chunks act returns.
    executor = policy.executor() if hasattr(policy, "executor") else Executor("receding", policy.n_action_steps, policy.n_action_steps)
    plan = getattr(policy, "plan", None) if hasattr(policy, "executor") else policy.act
    executor.reset(n)
    step = 0
    with tqdm(total=n * max_steps, disable=not progress, desc="rollouts", unit="step") as bar:
        while True:
            active = [i for i in range(n) if not results[i]["done"] and results[i]["length"] < max_steps]
            if not active:
                break
            if executor.due(step):
                stack_batch = getattr(policy, "stack_batch", None)  # a Policy; anything with stack/act also runs
                history = (stack_batch([histories[i] for i in active]) if stack_batch else
                           np.stack([policy.stack(list(histories[i])) for i in active]))
                executor.plan(plan, history, active, step, getattr(policy, "weak_plan", None))
            for i in active:
                r = results[i]
                obs, reward, done, info = envs[i].step(executor.action(i, step))
                histories[i].append(obs)
                r["length"] += 1
                r["max_reward"] = max(r["max_reward"], float(reward))
                r["success"] = r["success"] or bool(info.get("is_success", False))
                r["done"] = bool(done)
                if "route" in info:
                    r["route"] = int(info["route"])
                if i < render_episodes:
                    r["frames"].append(envs[i].render())
                bar.update(1)
            step += 1
            # Episodes that ended early free their remaining budget in the bar.
            bar.total = sum(r["length"] if r["done"] else max_steps for r in results)
    for i, r in enumerate(results):
        r.update(executor.smoothness(i))
    for env in envs:
        env.close()
    for r in results:
        del r["done"]
    return results


def summarize(results: list[dict]) -> dict:
    """The paper's scores: mean max-reward ('coverage' on Push-T), success rate, mean episode length."""
    out = {
        "num_episodes": len(results),
        "mean_max_reward": float(np.mean([r["max_reward"] for r in results])),
        "success_rate": float(np.mean([r["success"] for r in results])),
        "mean_length": float(np.mean([r["length"] for r in results])),
    }
    if results and "jerk" in results[0]:
        out["mean_jerk"] = float(np.mean([r["jerk"] for r in results]))
        out["mean_boundary_jump"] = float(np.mean([r["boundary_jump"] for r in results]))
    routes = [r["route"] for r in results if "route" in r]
    if routes:
        successful = [r["route"] for r in results if r.get("success") and "route" in r]
        out["route_left"] = float(np.mean([x == -1 for x in successful])) if successful else 0.0
        out["route_right"] = float(np.mean([x == 1 for x in successful])) if successful else 0.0
    return out


def chunk_latency(policy, make_env: Callable, seed: int = 0, repeats: int = 10) -> float:
    """Median seconds for one plan at batch 1 (what a robot waits for), after one warm-up call: one chunk, or with
    bidirectional decoding all its candidates and the weak policy's."""
    env = make_env()
    obs = env.reset(seed=seed)
    env.close()
    history = [obs] * policy.n_obs_steps
    if hasattr(policy, "executor"):
        executor, batch = policy.executor(), policy.stack_batch([history])
        executor.reset(1)
        executor.plan(policy.plan, batch, [0], 0, policy.weak_plan)  # a previous chunk, which rtc inpaints toward
        later = max(1, executor.every - executor.delay)  # the step of the next plan
        plan = lambda: executor.plan(policy.plan, batch, [0], later, policy.weak_plan)  # noqa: E731
    else:
        plan = lambda: policy.act(history)  # noqa: E731
    plan()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        plan()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _env_max_steps(make_env: Callable) -> int:
    env = make_env()
    env.close()
    return env.max_steps


def evaluate_policy(policy, num_episodes: int, seed: int, max_steps: int | None = None, render_episodes: int = 0,
                    video_dir=None, progress: bool = False) -> dict:
    """The paper's protocol (seeds seed..seed+num_episodes-1, receding horizon) plus NFE, sampler and latency per chunk,
    in the environment of the policy's task."""
    from difflab.pictures import save_gif

    make_env = policy.make_env
    start = time.perf_counter()
    results = run_episodes(policy, make_env, list(range(seed, seed + num_episodes)), max_steps, render_episodes, progress)
    seconds = time.perf_counter() - start
    out = {
        **summarize(results),
        "seeds": [seed, seed + num_episodes - 1],
        "max_steps": max_steps or _env_max_steps(make_env),
        "sampler": policy.sampler or getattr(policy.module, "sampler", None),
        "steps": policy.steps or getattr(policy.module, "sample_steps", None),
        "nfe": policy.nfe,
        "n_action_steps": policy.n_action_steps,
        "execution": getattr(policy, "execution", "receding"),
        "inference_delay": getattr(policy, "inference_delay", 0),
        "env_options": dict(getattr(policy, "env_options", {})),
        "latency_per_chunk_s": round(chunk_latency(policy, make_env, seed), 5),
        "rollout_seconds": round(seconds, 1),
        "per_episode": [{k: v for k, v in r.items() if k != "frames"} for r in results],
    }
    if video_dir is not None:
        out["videos"] = [str(save_gif(r["frames"], f"{video_dir}/episode_{r['seed']}.gif")) for r in results if r["frames"]]
    return out
