"""Push-T policy benchmark: train (or resume) a policy run, then score its checkpoints closed-loop.

    python benchmarks/pusht.py --experiment pusht_ddpm --max-steps 16000
    python benchmarks/pusht.py --experiment pusht_bc_mse --max-steps 8000

Everything goes to benchmarks/runs/<experiment>/ (checkpoints every validation, so
a stopped run resumes from last.ckpt when started again). Scores: the paper's
protocol (seeds 100000..100049, 300 steps) and a wider set of 200 seeds
(200000..200199), for the checkpoint with the best training-time rollout score
(on seeds 0..29, apart from both) and for the last one; each with the
sampler settings given by --samplers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="pusht_ddpm")
    parser.add_argument("--max-steps", type=int, default=16000)
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--samplers", default="ddim:10,ancestral:100", help="comma list of sampler:steps (bc_mse: direct:1)")
    parser.add_argument("--checkpoints", default="last,best", help="which checkpoints to score: last, best or both")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra train.py overrides")
    args = parser.parse_args()
    run_dir = Path(args.run_dir or ROOT / "benchmarks" / "runs" / args.experiment)
    last = run_dir / "checkpoints" / "last.ckpt"
    done_marker = run_dir / "final" / "metrics.json"

    if not done_marker.exists():
        cmd = [sys.executable, "train.py", f"experiment={args.experiment}", f"trainer.max_steps={args.max_steps}",
               f"hydra.run.dir={run_dir}", "final_eval.num_episodes=50", *args.overrides]
        if last.exists():
            cmd.append(f"ckpt_path={last}")
        start = time.perf_counter()
        run(cmd)
        (run_dir / "train_wall_seconds.txt").write_text(f"{time.perf_counter() - start:.0f}\n")

    best = sorted(p for p in (run_dir / "checkpoints").glob("best*.ckpt"))
    wanted = args.checkpoints.split(",")
    checkpoints = {name: ckpt for name, ckpt in (("last", last), *((("best", best[-1]),) if best else ()))}
    checkpoints = {name: ckpt for name, ckpt in checkpoints.items() if name in wanted}
    results = {}
    for name, ckpt in checkpoints.items():
        for spec in args.samplers.split(","):
            sampler, steps = spec.split(":")
            for label, first_seed, n in (("paper_50", 100000, 50), ("wide_200", 200000, 200)):
                out = run_dir / "eval" / f"{name}_{sampler}{steps}_{label}.json"
                if not out.exists():
                    run([sys.executable, "evaluate.py", f"ckpt_path={ckpt}", "metric=policy", f"num_episodes={n}",
                         f"first_seed={first_seed}", f"sampler={sampler}", f"steps={steps}", f"out={out}", "progress=false"])
                r = json.loads(out.read_text())
                results[f"{name}/{sampler}{steps}/{label}"] = {k: r[k] for k in ("mean_max_reward", "success_rate", "mean_length", "nfe", "latency_per_chunk_s", "global_step")}
    summary = run_dir / "benchmark.json"
    summary.write_text(json.dumps({"experiment": args.experiment, "max_steps": args.max_steps, "threads": os.environ.get("OMP_NUM_THREADS"),
                                   "checkpoints": {k: str(v) for k, v in checkpoints.items()}, "results": results}, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
