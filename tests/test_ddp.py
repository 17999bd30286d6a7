"""DDP with 2 CPU processes (gloo): what must hold on every rank, checked on what each rank recorded."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.slow


def run_probe(out: Path, ckpt: Path | None = None) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    args = [sys.executable, str(ROOT / "tests" / "ddp_probe.py"), str(out)] + ([str(ckpt)] if ckpt else [])
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return out, run_probe(out)


def test_parameters_and_ema_are_identical_on_every_rank(ddp_run):
    _, (r0, r1) = ddp_run
    assert r0["world_size"] == r1["world_size"] == 2 and r0["step"] == r1["step"] == 8
    torch.testing.assert_close(r0["params_after_fit"], r1["params_after_fit"], rtol=0, atol=0)
    assert not torch.equal(r0["params_after_fit"], r0["start_params"])  # it did train


def test_each_rank_sees_its_own_data_at_the_configured_batch_and_lr(ddp_run):
    _, (r0, r1) = ddp_run
    assert r0["batches"].shape == r1["batches"].shape == (8, 16, 2)  # data.batch_size is per device
    assert not torch.equal(r0["batches"], r1["batches"])  # DistributedSampler: distinct shards
    assert r0["lr"] == r1["lr"] == 1e-3


def test_samples_are_split_over_ranks_and_counted_exactly_once(ddp_run):
    _, (r0, r1) = ddp_run
    for key in ("synced", "gathered"):
        rows = r0[key]
        assert rows.shape == (11, 2), key  # num_samples in total, not per rank
        assert torch.unique(rows, dim=0).shape[0] == 11, f"{key}: duplicate samples across ranks"
    torch.testing.assert_close(r0["synced"], r1["synced"])  # a synced metric sees the same set on every rank
    assert r1["gathered"] is None  # a gathered metric is computed once, on rank 0


def test_checkpoints_and_images_are_written_once(ddp_run):
    out, _ = ddp_run
    assert sorted(p.name for p in (out / "checkpoints").glob("*.ckpt")) == ["epoch=0-step=4.ckpt", "epoch=0-step=8.ckpt", "last.ckpt"]
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step_0000004.png", "step_0000008.png"]


def test_resume_under_ddp_restores_every_rank(ddp_run, tmp_path):
    out, _ = ddp_run
    ckpt_path = out / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=False)
    r0, r1 = run_probe(tmp_path, ckpt_path)
    raw = torch.cat([v.flatten() for v in ckpt["current_model_state"].values() if v.dtype.is_floating_point])
    ema = torch.cat([v.flatten() for v in ckpt["state_dict"].values() if v.dtype.is_floating_point])
    for r in (r0, r1):
        assert r["start_step"] == 8 and r["step"] == 10
        torch.testing.assert_close(r["start_params"], raw, rtol=0, atol=0)
        torch.testing.assert_close(r["start_ema"], ema, rtol=0, atol=0)
    torch.testing.assert_close(r0["params_after_fit"], r1["params_after_fit"], rtol=0, atol=0)
