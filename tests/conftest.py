import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one worker per core: a worker's torch must not also spread over every core, or the
    # workers oversubscribe the machine (measured several times slower on 2 cores).
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


def run_cli(script: str, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run train.py / sample.py / evaluate.py as a user would, with its exit code and output; in this process
    (tests/cli_harness.py: no interpreter start-up per call), so `pytest -m "not slow"` spawns no training."""
    from cli_harness import run_script

    outcome = run_script(script, *overrides)
    proc = subprocess.CompletedProcess([script, *overrides], outcome.code, outcome.stdout, outcome.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(overrides)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


class ExactDDPMNet(torch.nn.Module):
    """A DDPM 'net' at integer step t that returns the exact eps (or x0 / v) of a known score:
    score(x, a, s, cond) of x_t = a x0 + s eps, with a and s per row, in float64."""

    def __init__(self, schedule, score, prediction="eps"):
        super().__init__()
        self.schedule, self.score, self.prediction = schedule, score, prediction

    def forward(self, x, t, cond=None):
        i = t.round().long()
        a = self.schedule.sqrt_alphas_cumprod[i].double()
        s = self.schedule.sqrt_one_minus_alphas_cumprod[i].double()
        eps = -s[:, None] * self.score(x.double(), a, s, cond)
        x0 = (x.double() - s[:, None] * eps) / a[:, None]
        return {"eps": eps, "x0": x0, "v": a[:, None] * eps - s[:, None] * x0}[self.prediction].to(x.dtype)


def assert_loss_optimum_at_zero(loss, param, sample, perturbed_value: float, seed: int, batches: int = 16):
    """The loss's gradient in the scalar `param` vanishes at 0 (the exact target) within 5 standard errors over
    `batches` seeded batches of 1000, and is clearly positive at `perturbed_value`."""

    def gradients(value: float):
        with torch.no_grad():
            param.fill_(value)
        grads = []
        for k in range(batches):
            batch = {"x": sample(1000, torch.Generator().manual_seed(seed + k))}
            (grad,) = torch.autograd.grad(loss(batch, torch.Generator().manual_seed(seed + 100 + k)), param)
            grads.append(grad.item())
        return torch.tensor(grads, dtype=torch.float64)

    at_optimum, perturbed = gradients(0.0), gradients(perturbed_value)
    se = lambda g: g.std().item() / math.sqrt(len(g))  # noqa: E731
    assert abs(at_optimum.mean().item()) < 5 * se(at_optimum), (at_optimum.mean(), se(at_optimum))
    assert perturbed.mean().item() > 5 * se(perturbed), (perturbed.mean(), se(perturbed))
