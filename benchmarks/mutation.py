"""Mutation testing of the math modules with the fast unit tests: `python benchmarks/mutation.py [--children 2]`.

mutmut (pip install mutmut) changes one operator, constant or name at a time in the modules listed under
[tool.mutmut] in pyproject.toml and runs the unit tests that reach the changed function; a mutant the tests do
not fail "survives". This script runs it (resumable: mutmut keeps its results in mutants/ and continues where it
stopped) and prints, per module, how many mutants were killed (a test failed, or it ran past the timeout) and
which survived. `--report-only` prints the table from the last run without running anything.

The full set (about 4,400 mutants) takes many hours on 2 cores, because a mutant that survives runs every test
that reaches its function, the slow mixture-sampler tests among them. `--sample 5` tests a fixed fifth of them
(those whose name's md5 is 0 mod 5: the same mutants in every run, whatever changed elsewhere), which estimates
the score to about +-1.2 % (one standard error).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KILLED = {"killed", "timeout"}


def results(repo: Path) -> dict[str, str]:
    proc = subprocess.run(["mutmut", "results", "--all", "true"], cwd=repo, capture_output=True, text=True, check=True)
    out = {}
    for line in proc.stdout.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if name:
            out[name] = status
    return out


def module_of(mutant: str) -> str:
    """lightning_modules.ddpm.x_ddim_sample__mutmut_3 -> lightning_modules/ddpm.py"""
    head = re.split(r"\.x[_ǁ]", mutant, maxsplit=1)[0]
    return head.replace(".", "/") + ".py"


def in_sample(name: str, every: int) -> bool:
    return every <= 1 or int(hashlib.md5(name.encode()).hexdigest(), 16) % every == 0


def report(status: dict[str, str]) -> str:
    by_module: dict[str, Counter] = defaultdict(Counter)
    for name, s in status.items():
        by_module[module_of(name)][s] += 1
    lines = ["| module | mutants | killed | survived | other (no tests, not checked, ...) | score |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    total = Counter()
    for module in sorted(by_module):
        c = by_module[module]
        total.update(c)
        lines.append(row(module, c))
    lines.append(row("**all**", total))
    survivors = sorted(n for n, s in status.items() if s == "survived")
    lines += ["", f"{len(survivors)} survivors:"] + [f"- `{n}`" for n in survivors]
    return "\n".join(lines)


def row(name: str, c: Counter) -> str:
    killed, survived = sum(c[k] for k in KILLED), c["survived"]
    other = sum(c.values()) - killed - survived
    tested = killed + survived
    score = f"{100 * killed / tested:.1f}%" if tested else "-"
    return f"| {name} | {sum(c.values())} | {killed} | {survived} | {other} | {score} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--children", type=int, default=os.cpu_count() or 1, help="mutants tested in parallel")
    parser.add_argument("--repo", type=Path, default=ROOT, help="the checkout to mutate (its pyproject.toml has the config)")
    parser.add_argument("--sample", type=int, default=1, help="test every n-th mutant (a fixed, hash-chosen subset); 1: all")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if not args.report_only:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        names = []
        if args.sample > 1:  # mutmut lists every mutant (generating them) before the run; pick the sample from that list
            subprocess.run(["mutmut", "run", "--max-children", str(args.children), "__none__"], cwd=args.repo, env=env,
                           check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            names = [n for n in results(args.repo) if in_sample(n, args.sample)]
        subprocess.run(["mutmut", "run", "--max-children", str(args.children), *names], cwd=args.repo, env=env, check=False,
                       stdout=sys.stderr)
    status = {n: s for n, s in results(args.repo).items() if in_sample(n, args.sample)}
    print(report(status))


if __name__ == "__main__":
    main()
