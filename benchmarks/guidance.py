"""Classifier-free guidance on the class-conditional digits: the quality / label-accuracy trade-off over the scale.

    python train.py data.labels=true hydra.run.dir=logs/cond_digits        # the default run's budget and net
    python benchmarks/guidance.py --ckpt logs/cond_digits/checkpoints/last.ckpt --write

For each guidance scale w (and with the guidance interval), draws --num-samples samples with every class in turn
and the checkpoint's own sampler, and reports the digits Frechet distance (the default run's figure) and the share
of samples the digits classifier reads as their requested label, with the NFE spent. --write stores the table in
benchmarks/results/guidance_digits.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from datamodules.base import balanced_labels, one_hot  # noqa: E402
from lightning_modules.checkpoint import instantiate_datamodule, load_guide, load_module  # noqa: E402

SCALES = (0.0, 1.0, 1.5, 2.0, 3.0, 5.0)
INTERVAL = (0.28, 5.42)  # EDM2's guidance interval (Kynkaenniemi et al. 2024), in the VE sigma every method shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--scales", type=float, nargs="+", default=list(SCALES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guide", default=None, help="a weaker checkpoint of the same data: autoguidance rows too")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    module, ckpt = load_module(args.ckpt)
    datamodule = instantiate_datamodule(module.run_config)
    metric = datamodule.make_metric()
    labels = balanced_labels(args.num_samples, datamodule.num_classes)
    cond = one_hot(labels, datamodule.num_classes)
    rows = []
    print(f"{args.ckpt} (step {ckpt.get('global_step')}), {args.num_samples} samples, sampler {module.sampler}, floor {metric.floor():.3f}")
    print("| guidance | interval / guide | digits_frechet | label accuracy | NFE | seconds |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    guide = load_guide(args.guide, module) if args.guide else None
    settings = [(None, w) for w in args.scales] + [(INTERVAL, w) for w in args.scales if w not in (0.0, 1.0)]
    if guide is not None:  # autoguidance: the guide in the null pass's place
        settings += [("guide", w) for w in args.scales if w != 1.0]
    for interval, w in settings:
        start = time.perf_counter()
        if interval == "guide":
            options = {"guidance": w, "guide": guide}
        else:
            options = {"guidance": w} | ({"guidance_interval": list(interval)} if interval else {})
        x, nfe = module.sample_many(args.num_samples, 1000, torch.Generator().manual_seed(args.seed), cond=cond, return_nfe=True,
                                    **options)
        seconds = time.perf_counter() - start
        row = {"guidance": w, "interval": list(interval) if isinstance(interval, tuple) else None,
               "guide": str(args.guide) if interval == "guide" else None, "digits_frechet": float(metric(x)),
               "label_accuracy": float(datamodule.label_accuracy(x, labels).float().mean()), "nfe": nfe,
               "seconds": round(seconds, 2)}
        rows.append(row)
        shown = "autoguidance" if interval == "guide" else (interval or "-")
        print(f"| {w:g} | {shown} | {row['digits_frechet']:.3f} | {row['label_accuracy']:.4f} | {nfe} | {seconds:.1f} |", flush=True)
    if args.write:
        out = ROOT / "benchmarks" / "results" / "guidance_digits.json"
        out.write_text(json.dumps({"checkpoint": str(args.ckpt), "global_step": ckpt.get("global_step"),
                                   "num_samples": args.num_samples, "sampler": module.sampler, "floor": metric.floor(),
                                   "rows": rows}, indent=2))
        print(f"-> {out}")


if __name__ == "__main__":
    main()
