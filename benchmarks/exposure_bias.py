"""Exposure bias: baseline DDPM, scheduled sampling (each roll-back), input perturbation, epsilon scaling and
time-step shifting, on a 2-D toy and digits, for ancestral sampling (all T steps) and DDIM-10, over seeds; beside
them the solver answer to few steps: DDIM-10 on the quadratic grid and DPM-Solver++(2M) at 10 NFE on both grids.

    python benchmarks/exposure_bias.py --data toy2d --seeds 0 1 2
    python benchmarks/exposure_bias.py --data digits --seeds 0 1 2
    PUSHT_ZARR=/path/pusht_cchi_v7_replay.zarr python benchmarks/exposure_bias.py --data pusht --seeds 0

On Push-T (`experiment=pusht_ddpm`, 8k steps, T=100) the quality figure is closed-loop: mean max-reward and
success over 200 episodes (seeds 200000..200199), for DDIM and DPM-Solver++(2M, quadratic grid) at 10 and 4 NFE
(the few-step samplers a policy uses); the scheduled-sampling roll-back `sampler_step` is matched to DDIM-10's stride.

Every training run and every evaluation is a file under benchmarks/runs/eb_<data>_<variant>_s<seed>/ and is
skipped when present, so a stopped benchmark resumes. The table (mean +- std over seeds of the quality
figure, Ning's delta_sum, and the training seconds per step) is printed and written to
benchmarks/runs/exposure_<data>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = {"toy2d": ["data=toy2d", "data.name=swiss_roll"], "digits": ["data=digits"],
        "pusht": ["experiment=pusht_ddpm", "trainer.max_steps=8000", "final_eval.num_episodes=50", "callbacks.rollout.every_n_val=4"]}
TRAINED = {  # variant: train.py overrides
    "baseline": ["model=ddpm"],
    "ss_renoise": ["model=scheduled_sampling", "model.ss_rollback=renoise"],
    "ss_ancestral": ["model=scheduled_sampling", "model.ss_rollback=ancestral", "model.sampling.options.variance=posterior"],
    "ss_sampler_step": ["model=scheduled_sampling", "model.ss_rollback=sampler_step", "model.sampling.steps=10"],
    "input_perturbation": ["model=ddpm", "model.input_perturbation=0.1"],
}
SAMPLERS = {"ancestral": ["sampler=ancestral"], "ddim50": ["sampler=ddim", "steps=50"], "ddim10": ["sampler=ddim", "steps=10"], "ddim4": ["sampler=ddim", "steps=4"],
            "ddim10_quadratic": ["sampler=ddim", "steps=10", "ddim_spacing=quadratic"],
            "dpmpp2m10": ["sampler=dpmpp_2m", "steps=10"], "dpmpp2m4": ["sampler=dpmpp_2m", "steps=4"],
            "dpmpp2m10_quadratic": ["sampler=dpmpp_2m", "steps=10", "ddim_spacing=quadratic"],
            "dpmpp2m4_quadratic": ["sampler=dpmpp_2m", "steps=4", "ddim_spacing=quadratic"]}
FEW_STEP = ["ddim10", "ddim10_quadratic", "dpmpp2m10", "dpmpp2m10_quadratic"]
DEFAULT_SAMPLERS = {"toy2d": ["ancestral", *FEW_STEP], "digits": ["ancestral", *FEW_STEP],
                    "pusht": ["ddim10", "ddim4", "dpmpp2m10_quadratic", "dpmpp2m4_quadratic"]}
POLICY_EPISODES = ["metric=policy", "num_episodes=200", "first_seed=200000"]
SAMPLING_FIXES = {"eps_scale_1.01": ["eps_scale=1.01"], "eps_scale_1.03": ["eps_scale=1.03"], "time_shift_5": ["time_shift_window=5"]}


def run(args: list[str]) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def train(data: str, variant: str, seed: int) -> Path:
    run_dir = ROOT / "benchmarks" / "runs" / f"eb_{data}_{variant}_s{seed}"
    if not (run_dir / "final" / "metrics.json").exists():
        last = run_dir / "checkpoints" / "last.ckpt"
        run(["train.py", *TRAINED[variant], *DATA[data], f"seed={seed}", f"hydra.run.dir={run_dir}", "callbacks.quality.every_n_val=100",
             "callbacks.exposure_bias.every_n_val=0", *([f"ckpt_path={last}"] if last.exists() else [])])
    return run_dir


def evaluate(run_dir: Path, label: str, overrides: list[str]) -> dict:
    out = run_dir / "eval" / f"{label}.json"
    if not out.exists():
        run(["evaluate.py", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"out={out}", "progress=false", *overrides])
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=sorted(DATA), default="toy2d")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--ancestral-samples", type=int, default=None,
                        help="samples for the ancestral quality figure (default: --num-samples); a smaller count is "
                             "written to its own file (quality_ancestral*_n<N>.json) and skips the ancestral exposure run")
    parser.add_argument("--variants", nargs="+", choices=sorted(TRAINED), default=list(TRAINED), help="trained variants to run (default: all)")
    parser.add_argument("--samplers", nargs="+", choices=sorted(SAMPLERS), default=None,
                        help="samplers to evaluate (default: ancestral and ddim10; pusht: ddim10 and ddim4). "
                             "Ancestral runs all T steps and dominates the CPU time on digits")
    parser.add_argument("--fix-samplers", nargs="+", choices=sorted(SAMPLERS), default=None,
                        help="samplers the sampling-time fixes (eps scaling, time shifting) are evaluated with "
                             "(default: every sampler in --samplers)")
    args = parser.parse_args()
    rows: dict[tuple[str, str], dict[str, list[float]]] = {}
    for seed in args.seeds:
        for variant in args.variants:
            run_dir = train(args.data, variant, seed)
            final = json.loads((run_dir / "final" / "metrics.json").read_text())
            fixes = {"": []} if variant != "baseline" else {"": [], **{f"+{k}": v for k, v in SAMPLING_FIXES.items()}}
            for sampler in args.samplers or DEFAULT_SAMPLERS[args.data]:
                sampler_args = SAMPLERS[sampler]
                for fix, fix_args in fixes.items():
                    if fix and args.fix_samplers is not None and sampler not in args.fix_samplers:
                        continue
                    if fix.startswith("+time_shift") and sampler.startswith("dpmpp"):
                        continue  # time shifting is defined for the ancestral and DDIM steps only
                    row = rows.setdefault((variant + fix, sampler), {"quality": [], "floor": [], "delta_sum": [], "sec_per_step": []})
                    row["sec_per_step"].append(final["train_seconds"] / max(final["global_step"], 1))
                    if args.data == "pusht":  # closed loop: no sample-quality metric and no unconditional exposure measurement
                        p = evaluate(run_dir, f"policy_{sampler}{fix}", [*POLICY_EPISODES, *sampler_args, *fix_args])
                        row["quality"].append(p["mean_max_reward"])
                        row.setdefault("success", []).append(p["success_rate"])
                        continue
                    n = args.ancestral_samples if sampler == "ancestral" and args.ancestral_samples else args.num_samples
                    suffix = "" if n == args.num_samples else f"_n{n}"
                    q = evaluate(run_dir, f"quality_{sampler}{fix}{suffix}", [*sampler_args, *fix_args, f"num_samples={n}"])
                    row["quality"].append(q["value"])
                    row["floor"].append(q["floor"])
                    if not suffix:
                        e = evaluate(run_dir, f"exposure_{sampler}{fix}", ["metric=exposure_bias", *sampler_args, *fix_args, "num_samples=512"])
                        row["delta_sum"].append(e["value"])
    table = {f"{v} | {s}": {k: [float(np.mean(x)), float(np.std(x))] for k, x in r.items() if x} for (v, s), r in rows.items()}
    (ROOT / "benchmarks" / "runs" / f"exposure_{args.data}.json").write_text(json.dumps(table, indent=2))
    if args.data == "pusht":
        print(f"| variant | sampler | mean max-reward (mean +- std over {len(args.seeds)} seeds) | success | train s/step |")
        print("| --- | --- | --- | --- | --- |")
        for (v, s), r in rows.items():
            print(f"| {v} | {s} | {np.mean(r['quality']):.4g} +- {np.std(r['quality']):.2g} | {np.mean(r['success']):.3g} | {np.mean(r['sec_per_step']):.4f} |")
        return
    print(f"| variant | sampler | quality (mean +- std over {len(args.seeds)} seeds) | floor | delta_sum | train s/step |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (v, s), r in rows.items():
        print(f"| {v} | {s} | {np.mean(r['quality']):.4g} +- {np.std(r['quality']):.2g} | {np.mean(r['floor']):.3g} | "
              f"{np.mean(r['delta_sum']) if r['delta_sum'] else float('nan'):.4g} | {np.mean(r['sec_per_step']):.4f} |")


if __name__ == "__main__":
    main()
