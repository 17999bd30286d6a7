import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one worker per core: a worker's torch must not also spread over every core, or the
    # workers oversubscribe the machine (measured several times slower on 2 cores).
    import torch

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="session", autouse=True)
def difflab_cache(tmp_path_factory):
    """One metrics cache (digits classifier) per test session, shared with CLI subprocesses; never ~/.cache."""
    path = tmp_path_factory.mktemp("difflab_cache")
    old = os.environ.get("DIFFLAB_CACHE")
    os.environ["DIFFLAB_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("DIFFLAB_CACHE", None)
    else:
        os.environ["DIFFLAB_CACHE"] = old


def run_cli(script: str, *overrides: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run train.py / sample.py / evaluate.py as a user would, with its exit code and output; in this process
    (tests/cli_harness.py: no interpreter start-up per call), so `pytest -m "not slow"` spawns no training."""
    from cli_harness import run_script

    outcome = run_script(script, *overrides)
    proc = subprocess.CompletedProcess([script, *overrides], outcome.code, outcome.stdout, outcome.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(overrides)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc
