"""Latency per action chunk at batch 1 for several policies, measured interleaved in one process so that their
ratios hold on a shared, noisy machine (the per-run figure of evaluate.py is taken whenever that run happens).

    OMP_NUM_THREADS=1 python benchmarks/chunk_latency.py \\
        teacher=benchmarks/runs/pusht_edm/checkpoints/last.ckpt:heun:10 \\
        cd=benchmarks/runs/cm_pusht_cd/checkpoints/last.ckpt:cm:1 --rounds 30

Each round calls every policy once (after one warm-up call each) on the same observation; the figure is the
median over rounds, and each ratio is taken against the first policy named. JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("policies", nargs="+", help="name=CKPT:SAMPLER:STEPS (SAMPLER:STEPS may be omitted: the model's default)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from envs.policy import load_policy

    policies = {}
    for spec in args.policies:
        name, _, rest = spec.partition("=")
        ckpt, *sampling = rest.split(":")
        sampler, steps = (sampling[0], int(sampling[1])) if len(sampling) == 2 else (None, None)
        policy, _ = load_policy(ckpt, sampler, steps, device="cpu", seed=0)
        env = policy.make_env()
        obs = env.reset(seed=0)
        env.close()
        history = [obs] * policy.n_obs_steps
        policy.act(history)  # warm-up
        policies[name] = (policy, history)
    times = {name: [] for name in policies}
    for _ in range(args.rounds):
        for name, (policy, history) in policies.items():
            start = time.perf_counter()
            policy.act(history)
            times[name].append(time.perf_counter() - start)
    first = next(iter(policies))
    base = float(np.median(times[first]))
    result = {"threads": torch.get_num_threads(), "rounds": args.rounds, "policies": {}}
    for name, (policy, _) in policies.items():
        median = float(np.median(times[name]))
        result["policies"][name] = {"nfe": policy.nfe, "median_s": median, "speedup_vs_first": base / median}
        print(f"{name:24s} {policy.nfe!s:>4} NFE  {median * 1000:8.2f} ms  x{base / median:6.1f} vs {first}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
