"""Consistency-model benchmark: EDM teacher at 35 and 1 NFE, distillation (CD) and training without a teacher
(CT, iCT-style) at 1 and 2 NFE, on swiss roll and digits, with the data's floor.

    python benchmarks/consistency.py --data toy2d            # ~10 CPU-minutes
    python benchmarks/consistency.py --data digits           # ~30 CPU-minutes

Every stage writes into benchmarks/runs/cm_<data>_<stage>/ and is skipped when its final/metrics.json exists,
so a stopped benchmark resumes where it was. The table goes to benchmarks/runs/cm_<data>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    # data override, steps for teacher / CD / CT, validation interval
    "toy2d": (["data=toy2d", "data.name=swiss_roll"], 4000, 2000, 4000, 1000),
    "digits": (["data=digits"], 3000, 3000, 3000, 1000),
}


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True)


def train(name: str, overrides: list[str]) -> Path:
    run_dir = ROOT / "benchmarks" / "runs" / name
    if not (run_dir / "final" / "metrics.json").exists():
        last = run_dir / "checkpoints" / "last.ckpt"
        run(["train.py", *overrides, f"hydra.run.dir={run_dir}", "callbacks.quality.every_n_val=100", "logger=tensorboard",
             *([f"ckpt_path={last}"] if last.exists() else [])])
    return run_dir


def evaluate(run_dir: Path, label: str, sampler: str, steps: int, extra: list[str] = ()) -> dict:
    out = run_dir / "eval" / f"{label}.json"
    if not out.exists():
        run(["evaluate.py", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"sampler={sampler}", f"steps={steps}",
             "num_samples=2000", f"out={out}", "progress=false", *extra])
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=sorted(SETTINGS), default="toy2d")
    parser.add_argument("--stages", default="teacher,cd,ct")
    args = parser.parse_args()
    data, teacher_steps, cd_steps, ct_steps, val = SETTINGS[args.data]
    common = [*data, f"trainer.val_check_interval={val}", "final_eval.num_samples=2000"]
    stages = args.stages.split(",")
    rows = {}
    teacher = train(f"cm_{args.data}_edm", ["model=edm", *common, f"trainer.max_steps={teacher_steps}"])
    teacher_ckpt = teacher / "checkpoints" / "last.ckpt"
    rows["EDM teacher, Heun 18 steps"] = evaluate(teacher, "heun18", "heun", 18)
    rows["EDM teacher, 1 Euler step"] = evaluate(teacher, "euler1", "euler", 1)
    if "cd" in stages:
        cd = train(f"cm_{args.data}_cd", ["model=consistency", f"model.teacher_ckpt={teacher_ckpt}", *common, f"trainer.max_steps={cd_steps}"])
        rows["CD, 1 step"] = evaluate(cd, "cm1", "cm", 1)
        rows["CD, 2 steps"] = evaluate(cd, "cm2", "cm", 2)
    if "ct" in stages:
        ct = train(f"cm_{args.data}_ct", ["model=consistency_training", *common, f"trainer.max_steps={ct_steps}"])
        rows["CT, 1 step"] = evaluate(ct, "cm1", "cm", 1)
        rows["CT, 2 steps"] = evaluate(ct, "cm2", "cm", 2)
    table = {name: {k: r[k] for k in ("metric", "value", "floor", "nfe", "num_samples", "global_step")} for name, r in rows.items()}
    (ROOT / "benchmarks" / "runs" / f"cm_{args.data}.json").write_text(json.dumps(table, indent=2))
    for name, r in table.items():
        print(f"{name:32s} {r['metric']} {r['value']:.4g} (floor {r['floor']:.4g}), {r['nfe']} NFE, step {r['global_step']}")


if __name__ == "__main__":
    main()
