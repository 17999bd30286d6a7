"""Run train.py / sample.py / evaluate.py in this process, as `python <script> args...` would (runpy, so Hydra
finds configs/ next to the script), capturing the exit code and what it printed. In-process saves the ~5 s
interpreter and torch start-up a subprocess pays per call."""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error: ")]


def run_script(script: str, *args: str) -> Outcome:
    old_argv, old_env = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = [str(ROOT / script), *args]
    os.environ.pop("HYDRA_FULL_ERROR", None)
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = old_argv
        if old_env is not None:
            os.environ["HYDRA_FULL_ERROR"] = old_env
    return Outcome(code, out.getvalue(), err.getvalue())


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}
