"""The Push-T leaderboard: every policy method, trained on the same demos, scored with the same runner under both
protocols researchers quote (issues 20 and 34).

    PUSHT_ZARR=... python benchmarks/leaderboard.py                           # Push-T, CPU widths, 1 seed
    python benchmarks/leaderboard.py --max-train-episodes 90 --seeds 0,1,2    # the paper's data size and seeds
    python benchmarks/leaderboard.py --methods dp_c --protocols paper         # one method, the paper's protocol only
    python benchmarks/leaderboard.py --data obstacle2d                        # the two-route task, with the route split
    python benchmarks/leaderboard.py --paper-widths                           # the paper's nets (a GPU's job)
    python benchmarks/leaderboard.py --images --methods dp_c,bc_mse           # image observations (96x96 frames + agent_pos)

Protocols (evaluation/policy_scores.py; their seed sets are disjoint):
- the paper's: during training the EMA policy is rolled out every --eval-every steps on the same 50 starting states
  (100000..100049, 300 steps), and the row gives the max and the mean of the last 10 of those evaluations (mean
  max-reward, "coverage"), averaged over training seeds;
- LeRobot's: the final checkpoint on 500 episodes (300000..300499): mean max-reward and success (coverage > 0.95)
  with the 68% interval of the success rate's Beta posterior (uniform prior; the successes of all seeds pooled).
Beside them: the last checkpoint on 200 other seeds (200000..200199), NFE, latency per chunk at batch 1 (run with
OMP_NUM_THREADS=1 for one thread), parameters, steps and CPU minutes of training on this machine. A learning-curve
plot per method goes to benchmarks/results/, and the table to JSON and Markdown there.

Every run writes into benchmarks/runs/table_<data>[_e<episodes>][_paper]/<method>_s<seed>/ and is skipped when its
final/metrics.json exists (a stopped run resumes from last.ckpt); every evaluation is skipped when its JSON exists.
The table goes to benchmarks/runs/table_<data>...json and benchmarks/results/ (the copy to commit) and is printed;
rows already in benchmarks/results/ for methods not run this time are kept, so a table fills one method (and one
--max-steps) at a time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from evaluation.policy_scores import SEED_SETS, beta_interval, check_disjoint, curve_summary  # noqa: E402
RUNS = ROOT / "benchmarks" / "runs"
RESULTS = ROOT / "benchmarks" / "results"

# method: (label, train.py overrides on Push-T, on obstacle2d, the paper's widths (Push-T), published max / mean)
METHODS = {
    "dp_c": ("Diffusion Policy, CNN (DDIM-10)", ["experiment=pusht_ddpm"], ["model=ddpm"],
             ["net=unet1d_paper"], (0.95, 0.91)),
    "dp_t": ("Diffusion Policy, transformer (DDIM-10)", ["experiment=pusht_ddpm_transformer"],
             ["model=ddpm", "net=transformer1d_small"], ["net=transformer1d"], (0.95, 0.79)),
    "bet": ("BET", ["experiment=pusht_bet"], ["model=bet", "data.horizon=3", "data.n_obs_steps=3", "data.n_action_steps=1"],
            [], (0.79, 0.70)),
    "lstm_gmm": ("LSTM-GMM", ["experiment=pusht_lstm_gmm"],
                 ["model=lstm_gmm", "data.horizon=10", "data.n_obs_steps=10", "data.n_action_steps=1"], [], (0.67, 0.61)),
    "vae": ("VAE policy (CVAE, chunks)", ["experiment=pusht_vae"], ["model=vae_policy"], [], None),
    "bc_mse": ("MSE regression (BC)", ["experiment=pusht_bc_mse"], ["model=bc_mse"], [], None),
}
# The paper's image-based Push-T figures (max / mean of the last 10), where it has them.
PUBLISHED_IMAGE = {"dp_c": (0.91, 0.84), "dp_t": (0.78, 0.66), "lstm_gmm": (0.69, 0.54)}


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True)


def rollout_history(run_dir: Path) -> list[tuple[int, float]]:
    """(step, rollout/mean_max_reward) of every training-time evaluation, from the TensorBoard events (a resumed
    run logs again from its checkpoint's step: the last value per step wins)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    by_step: dict[int, float] = {}
    for events in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if "rollout/mean_max_reward" in acc.Tags().get("scalars", []):
            by_step.update({e.step: e.value for e in acc.Scalars("rollout/mean_max_reward")})
    return sorted(by_step.items())


def train(run_dir: Path, overrides: list[str]) -> float:
    """Train (or resume) the run; its wall seconds over all pieces."""
    wall = run_dir / "train_wall_seconds.txt"
    if not (run_dir / "final" / "metrics.json").exists():
        last = run_dir / "checkpoints" / "last.ckpt"
        start = time.perf_counter()
        run(["train.py", *overrides, f"hydra.run.dir={run_dir}", "logger=tensorboard",
             *([f"ckpt_path={last}"] if last.exists() else [])])
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(wall, "a") as f:  # one line per (resumed) piece
            f.write(f"{time.perf_counter() - start:.0f}\n")
    return sum(float(s) for s in wall.read_text().split()) if wall.exists() else float("nan")


def parameters(run_dir: Path) -> int:
    from lightning_modules.checkpoint import load_module

    module, _ = load_module(run_dir / "checkpoints" / "last.ckpt")
    return sum(p.numel() for p in module.parameters())


def plot_curves(name: str, method: str, per_seed: list[dict]) -> Path:
    """The paper protocol's evaluations over training, one line per training seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for s in per_seed:
        steps, values = zip(*s["curve"]) if s["curve"] else ((), ())
        ax.plot(steps, values, marker=".", label=f"seed {s['seed']}")
    ax.set_xlabel("training step"), ax.set_ylabel("mean max-reward (50 states)"), ax.set_ylim(0, 1), ax.grid(alpha=0.3)
    ax.set_title(f"{METHODS[method][0]}", fontsize=9), ax.legend(fontsize=7)
    out = RESULTS / f"{name}_{method}_curve.png"
    fig.tight_layout(), fig.savefig(out, dpi=110), plt.close(fig)
    return out


def markdown(rows: dict) -> str:
    head = ("| method | paper: max | paper: last 10 | LeRobot: reward | LeRobot: success (68%) | 200 seeds | NFE | ms/chunk | "
            "params | steps | CPU min | paper's max / last 10 |\n" + "|---" * 12 + "|\n")
    lines = []
    for r in rows.values():
        success = (f"{r['lerobot_success']:.3f} [{r['lerobot_success_interval'][0]:.3f}, {r['lerobot_success_interval'][1]:.3f}]"
                   if r.get("lerobot_success") is not None else "-")
        reward = f"{r['lerobot_reward']:.3f}" if r.get("lerobot_reward") is not None else "-"
        paper = "/".join(f"{v:.2f}" for v in r["published_max_mean"]) if r["published_max_mean"] else "-"
        lines.append(f"| {r['label']} | {r['max']:.3f} | {r['mean_last10']:.3f} | {reward} | {success} | {r['wide_200_reward']:.3f} / "
                     f"{r['wide_200_success']:.2f} | {r['nfe']} | {r['latency_per_chunk_s'] * 1000:.1f} | {r.get('parameters', 0) / 1e6:.2f}M | "
                     f"{r['max_steps']} | {r['train_wall_s'] / 60:.0f} | {paper} |")
    return head + "\n".join(lines) + "\n"


def evaluate(run_dir: Path, label: str) -> dict:
    first_seed, n = SEED_SETS[label]
    out = run_dir / "eval" / f"table_last_{label}.json"
    if not out.exists():
        run(["evaluate.py", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "metric=policy", f"num_episodes={n}",
             f"first_seed={first_seed}", f"out={out}", "progress=false"])
    return json.loads(out.read_text())


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=("pusht", "obstacle2d"), default="pusht")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--seeds", default="0", help="comma list of training seeds (the paper: 3)")
    parser.add_argument("--max-steps", type=int, default=None, help="training steps per run (default: Push-T 8000, obstacle2d 4000)")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between training-time evaluations (default max-steps / 20: "
                        "the last 10 are the second half of training)")
    parser.add_argument("--max-train-episodes", type=int, default=None, help="train on this many demonstration episodes (the paper: 90)")
    parser.add_argument("--paper-widths", action="store_true", help="the paper's nets (unet1d_paper, transformer1d): for a GPU")
    parser.add_argument("--images", action="store_true", help="Push-T from the camera frames plus agent_pos (issue 21), "
                        "through --obs-encoder")
    parser.add_argument("--obs-encoder", default=None, help="image encoder: conv_small (default on CPU widths) or resnet18 "
                        "(the paper's; the default with --paper-widths)")
    parser.add_argument("--protocols", default="paper,lerobot", help="comma list: paper (the training curve, always run) "
                        "and lerobot (the final checkpoint on 500 episodes)")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra train.py overrides for every run")
    args = parser.parse_args()
    check_disjoint()
    lerobot = "lerobot" in args.protocols.split(",")
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}: use {', '.join(METHODS)}")
    policy_seeds = [int(s) for s in args.seeds.split(",")]
    pusht = args.data == "pusht"
    if args.images and not pusht:
        parser.error("--images is for Push-T (obstacle2d has no camera)")
    encoder = args.obs_encoder or ("resnet18" if args.paper_widths else "conv_small")
    images = ["data.obs_keys=[image,agent_pos]", f"obs_encoder={encoder}"] if args.images else []
    max_steps = args.max_steps or (8000 if pusht else 4000)
    every = args.eval_every or max(max_steps // 20, 1)
    first, n = SEED_SETS["paper_50"]
    common = [f"trainer.max_steps={max_steps}", f"trainer.val_check_interval={every}", "callbacks.rollout.every_n_val=1",
              f"callbacks.rollout.seed={first}", f"callbacks.rollout.num_episodes={n}", "final_eval.num_episodes=50",
              *([f"data.max_train_episodes={args.max_train_episodes}"] if args.max_train_episodes else []), *images, *args.overrides]
    if not pusht:
        common = ["data=obstacle2d", *common]
    name = (f"table_{args.data}{'_image' if args.images else ''}{f'_e{args.max_train_episodes}' if args.max_train_episodes else ''}"
            f"{'_paper' if args.paper_widths else ''}")
    rows = {}
    for method in methods:
        label, on_pusht, on_obstacle, paper, published = METHODS[method]
        if args.images:
            published = PUBLISHED_IMAGE.get(method)
        overrides = [*(on_pusht if pusht else on_obstacle), *(paper if args.paper_widths and pusht else []), *common]
        per_seed = []
        for seed in policy_seeds:
            run_dir = RUNS / name / f"{method}_s{seed}"
            wall = train(run_dir, [*overrides, f"seed={seed}"])
            curve = rollout_history(run_dir)
            wide = evaluate(run_dir, "wide_200")
            big = evaluate(run_dir, "lerobot_500") if lerobot else None
            per_seed.append({"seed": seed, **curve_summary(curve), "wide_200_reward": wide["mean_max_reward"],
                             "lerobot_reward": None if big is None else big["mean_max_reward"],
                             "lerobot_successes": None if big is None else round(big["success_rate"] * big["num_episodes"]),
                             "lerobot_episodes": None if big is None else big["num_episodes"],
                             "parameters": parameters(run_dir),
                             "wide_200_success": wide["success_rate"], "nfe": wide["nfe"],
                             "latency_per_chunk_s": wide["latency_per_chunk_s"], "train_wall_s": wall,
                             "curve": [[int(step) + 1, round(float(v), 4)] for step, v in curve],  # the learning curve
                             **{k: wide[k] for k in ("route_left", "route_right") if k in wide}})
        pooled = [s for s in per_seed if s["lerobot_episodes"]]
        successes, episodes = sum(s["lerobot_successes"] for s in pooled), sum(s["lerobot_episodes"] for s in pooled)
        plot_curves(name, method, per_seed)
        rows[method] = {
            "label": label, "seeds": policy_seeds, "max_steps": max_steps, "eval_every": every,
            "train_episodes": args.max_train_episodes or "all", "observations": f"image ({encoder}) + agent_pos" if args.images else "state",
            "published_max_mean": published,
            **{k: mean([s[k] for s in per_seed]) for k in ("max", "mean_last10", "wide_200_reward", "wide_200_success",
                                                          "latency_per_chunk_s", "train_wall_s")},
            "nfe": per_seed[0]["nfe"], "parameters": per_seed[0]["parameters"], "per_seed": per_seed,
            "lerobot_reward": mean([s["lerobot_reward"] for s in pooled]) if pooled else None,
            "lerobot_success": successes / episodes if episodes else None,
            "lerobot_success_interval": beta_interval(successes, episodes) if episodes else None,
            **{k: mean([s[k] for s in per_seed]) for k in ("route_left", "route_right") if k in per_seed[0]},
        }
    # rows of methods not run this time stay (each row names its own max_steps): one method at a time fills a table
    kept = RESULTS / f"{name}.json"
    rows = {**({k: v for k, v in json.loads(kept.read_text()).items() if k not in rows} if kept.exists() else {}), **rows}
    rows = {m: rows[m] for m in METHODS if m in rows}
    out = RUNS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    # beside the runs (which stay on this machine) a copy to commit: notebook 06 reads it
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=2))
    (RESULTS / f"{name}.md").write_text(markdown(rows))
    print(f"{'method':42s} {'max':>6s} {'last10':>6s} {'200 seeds':>9s} {'success':>7s} {'NFE':>4s} {'ms/chunk':>8s} {'train s':>8s}  paper")
    for r in rows.values():
        paper = "/".join(f"{v:.2f}" for v in r["published_max_mean"]) if r["published_max_mean"] else "-"
        print(f"{r['label']:42s} {r['max']:6.3f} {r['mean_last10']:6.3f} {r['wide_200_reward']:9.3f} {r['wide_200_success']:7.2f} "
              f"{r['nfe']:>4} {r['latency_per_chunk_s'] * 1000:8.1f} {r['train_wall_s']:8.0f}  {paper}"
              + (f"  routes L/R {r['route_left']:.2f}/{r['route_right']:.2f}" if "route_left" in r else ""))


if __name__ == "__main__":
    main()
