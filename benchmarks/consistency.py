"""Consistency-model benchmark: an EDM teacher and its one- and few-step students, on swiss roll, digits and the
Push-T policy, each variant of issue 19 a stage.

    python benchmarks/consistency.py --data toy2d                          # ~10 CPU-minutes
    python benchmarks/consistency.py --data digits --stages cd,cd_ict,ect   # ~20 CPU-minutes a stage
    PUSHT_ZARR=... python benchmarks/consistency.py --data pusht --stages cd,ect

Stages (the teacher always comes first): cd (CD as the CM paper: l2, N = 18, uniform pairs, lambda = 1),
cd_ict (CD with iCT's loss: pseudo-Huber, lambda = 1 / dsigma, log-normal pairs, N = 40), cd_ict80 (the same
at N = 80), cd_dsm (cd_ict with a denoising term beside it), ect (consistency tuning of the teacher, no
teacher calls), ct (consistency training from scratch). Every student of an EDM teacher with the same net
starts from the teacher's weights.

Images and points: the figure from 2000 samples of evaluate.py (seed 0) at 1 and 2 steps. Push-T: closed-loop
mean max-reward and success on the paper's seeds 100000..100049 and on 200000..200199, with the latency per
chunk at batch 1 (run with OMP_NUM_THREADS=1 for one thread), the teacher at its default Heun-10 (19 NFE).

Every run writes into benchmarks/runs/cm_<data>_<stage>/ (Push-T's teacher: benchmarks/runs/pusht_edm, shared
with benchmarks/pusht.py) and is skipped when its final/metrics.json exists; every evaluation is skipped when
its JSON exists, so a stopped benchmark resumes where it was. The table goes to benchmarks/runs/cm_<data>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "benchmarks" / "runs"

# data overrides, teacher run name and overrides, steps for teacher / distillation / training, validation interval
SETTINGS = {
    "toy2d": (["data=toy2d", "data.name=swiss_roll", "final_eval.num_samples=2000"], "cm_toy2d_edm", ["model=edm"], 4000, 2000, 4000, 1000),
    "digits": (["data=digits", "final_eval.num_samples=2000"], "cm_digits_edm", ["model=edm"], 3000, 3000, 3000, 1000),
    "pusht": (["data=pusht", "final_eval.num_episodes=50"], "pusht_edm", ["experiment=pusht_edm"], 10000, 4000, 8000, 1000),
}
ICT_LOSS = ["model.loss=pseudo_huber", "model.weighting=ict", "model.pairs=lognormal"]
STAGES = {
    # name: (label, overrides; {teacher} is the teacher's checkpoint), whether it trains for the distillation budget
    "cd": ("CD (l2, N=18)", ["model=consistency", "model.teacher_ckpt={teacher}"], True),
    "cd_ict": ("CD, iCT loss, N=40", ["model=consistency", "model.teacher_ckpt={teacher}", *ICT_LOSS, "model.num_scales=40"], True),
    "cd_ict80": ("CD, iCT loss, N=80", ["model=consistency", "model.teacher_ckpt={teacher}", *ICT_LOSS, "model.num_scales=80"], True),
    "cd_dsm": ("CD, iCT loss, N=40, + 0.1 DSM", ["model=consistency", "model.teacher_ckpt={teacher}", *ICT_LOSS, "model.num_scales=40", "model.dsm_weight=0.1"], True),
    "ect": ("ECT (tuned from the teacher)", ["model=consistency_tuning", "model.init_ckpt={teacher}"], True),
    "ct": ("CT (no teacher, from scratch)", ["model=consistency_training"], False),
}
POLICY_SEEDS = (("paper_50", 100000, 50), ("wide_200", 200000, 200))


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True)


def train(run_dir: Path, overrides: list[str]) -> Path:
    if not (run_dir / "final" / "metrics.json").exists():
        last = run_dir / "checkpoints" / "last.ckpt"
        start = time.perf_counter()
        run(["train.py", *overrides, f"hydra.run.dir={run_dir}", "logger=tensorboard",
             *([f"ckpt_path={last}"] if last.exists() else [])])
        with open(run_dir / "train_wall_seconds.txt", "a") as f:  # one line per (resumed) piece
            f.write(f"{time.perf_counter() - start:.0f}\n")
    return run_dir


def evaluate(run_dir: Path, sampler: str, steps: int, policy: bool, extra: list[str] = ()) -> dict[str, dict]:
    """{label: result} for the run's last checkpoint: one 2000-sample figure, or the two policy seed sets."""
    ckpt = f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"
    tag = "".join(f"_{o.replace('=', '-')}" for o in extra)
    if not policy:
        out = run_dir / "eval" / f"{sampler}{steps}{tag}.json"
        if not out.exists():
            run(["evaluate.py", ckpt, f"sampler={sampler}", f"steps={steps}", "num_samples=2000", f"out={out}", "progress=false", *extra])
        return {"": json.loads(out.read_text())}
    results = {}
    for label, first_seed, n in POLICY_SEEDS:
        out = run_dir / "eval" / f"last_{sampler}{steps}{tag}_{label}.json"  # benchmarks/pusht.py's names: shared
        if not out.exists():
            run(["evaluate.py", ckpt, "metric=policy", f"num_episodes={n}", f"first_seed={first_seed}", f"sampler={sampler}",
                 f"steps={steps}", f"out={out}", "progress=false", *extra])
        results[label] = json.loads(out.read_text())
    return results


def row(result: dict, policy: bool) -> dict:
    keys = ("mean_max_reward", "success_rate", "nfe", "latency_per_chunk_s", "global_step") if policy else \
        ("metric", "value", "floor", "nfe", "num_samples", "global_step")
    return {k: result[k] for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=sorted(SETTINGS), default="toy2d")
    parser.add_argument("--stages", default="cd,ct", help=f"comma list of {', '.join(STAGES)}")
    parser.add_argument("--student-steps", default="1,2", help="comma list of consistency sampling steps to score")
    parser.add_argument("--init-noise-scales", default="", help="comma list of init_noise_scale < 1 to score each student "
                        "with at 1 step too (Consistency Policy's reduced initial variance), e.g. 0.5,0.8")
    args = parser.parse_args()
    unknown = set(args.stages.split(",")) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}: use {', '.join(STAGES)}")
    if args.data == "pusht" and "ct" in args.stages.split(","):
        parser.error("stage ct has no Push-T preset here: its from-scratch figure is benchmarks/pusht.py's")
    data, teacher_name, teacher_overrides, teacher_steps, distill_steps, train_steps, val = SETTINGS[args.data]
    policy = args.data == "pusht"
    common = [*data, f"trainer.val_check_interval={val}"]
    if not policy:
        common.append("callbacks.quality.every_n_val=100")
    rows: dict[str, dict] = {}

    def add(label: str, results: dict[str, dict]) -> None:
        for seeds, result in results.items():
            rows[f"{label}{f' [{seeds}]' if seeds else ''}"] = row(result, policy)

    teacher = train(RUNS / teacher_name, [*teacher_overrides, *common, f"trainer.max_steps={teacher_steps}"])
    teacher_ckpt = teacher / "checkpoints" / "last.ckpt"
    if policy:
        add("EDM teacher, Heun 10 steps", evaluate(teacher, "heun", 10, policy))
    else:
        add("EDM teacher, Heun 18 steps", evaluate(teacher, "heun", 18, policy))
        add("EDM teacher, 1 Euler step", evaluate(teacher, "euler", 1, policy))
    for stage in args.stages.split(","):
        label, overrides, distilled = STAGES[stage]
        if policy:  # the Push-T presets: data, net, batch, EMA and clipping of the policy
            overrides = [*overrides, "experiment=pusht_ect" if stage == "ect" else "experiment=pusht_consistency"]
        overrides = [o.format(teacher=teacher_ckpt) for o in overrides]
        steps = distill_steps if distilled else train_steps
        student = train(RUNS / f"cm_{args.data}_{stage}", [*overrides, *common, f"trainer.max_steps={steps}"])
        for n in (int(s) for s in args.student_steps.split(",")):
            add(f"{label}, {n} step{'s' if n > 1 else ''}", evaluate(student, "cm", n, policy))
        for scale in filter(None, args.init_noise_scales.split(",")):
            add(f"{label}, 1 step, init noise x{scale}", evaluate(student, "cm", 1, policy, [f"init_noise_scale={scale}"]))
    (RUNS / f"cm_{args.data}.json").write_text(json.dumps(rows, indent=2))
    for name, r in rows.items():
        if policy:
            print(f"{name:56s} reward {r['mean_max_reward']:.3f} success {r['success_rate']:.2f}, {r['nfe']} NFE, "
                  f"{r['latency_per_chunk_s'] * 1000:.1f} ms/chunk, step {r['global_step']}")
        else:
            print(f"{name:56s} {r['metric']} {r['value']:.4g} (floor {r['floor']:.4g}), {r['nfe']} NFE, step {r['global_step']}")


if __name__ == "__main__":
    main()
