"""`trainer.fast_dev_run=true` checks a config in seconds, for every data config and every method: one batch of
training and validation, every sampling callback with a handful of samples and the method's cheapest sampler,
and the final figure on at most 8 samples (1 short episode for policies), with Lightning's dummy loggers."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from cli_harness import run_script
from test_image_datamodules import make_fake_celeba, write_fake_cifar10

PUSHT_ZARR = os.environ.get("PUSHT_ZARR")
SMALL_IMAGE_NET = ["net=unet_small", "data.batch_size=4", "data.num_workers=0"]

CONFIGS = {
    "digits": [],
    "toy2d": ["data=toy2d"],
    "obstacle2d": ["data=obstacle2d"],
    "pusht": ["experiment=pusht_ddpm", f"data.path={PUSHT_ZARR}"],
    # No Inception weights offline: training without FID, and the final figure says it was skipped.
    "cifar10": ["data=cifar10", "data.root={root}", "data.val_size=8", "callbacks.quality=null", *SMALL_IMAGE_NET],
    "celeba": ["data=celeba", "data.root={root}", "data.resolution=32", "callbacks.quality=null", *SMALL_IMAGE_NET],
    # every method, on the toy (the four score models took over 15 minutes together before)
    "ncsn": ["data=toy2d", "model=ncsn"],
    "vesde": ["data=toy2d", "model=vesde"],
    "vpsde": ["data=toy2d", "model=vpsde"],
    "subvpsde": ["data=toy2d", "model=subvpsde"],
    "edm": ["data=toy2d", "model=edm"],
    "consistency_training": ["data=toy2d", "model=consistency_training"],
    "scheduled_sampling": ["data=toy2d", "model=scheduled_sampling"],
    "bc_mse": ["data=obstacle2d", "model=bc_mse"],
    "flow_matching_digits": ["model=flow_matching"],
    "flow_matching_toy2d": ["data=toy2d", "model=flow_matching"],
    "pusht_flow": ["experiment=pusht_flow", f"data.path={PUSHT_ZARR}"],
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fast_dev_run_checks_a_config_with_a_handful_of_samples(name, tmp_path):
    if name in ("pusht", "pusht_flow") and not (PUSHT_ZARR and Path(PUSHT_ZARR).exists()):
        pytest.skip("set PUSHT_ZARR to pusht_cchi_v7_replay.zarr")
    if name == "cifar10":
        write_fake_cifar10(tmp_path / "cifar-10-batches-py")
    if name == "celeba":
        make_fake_celeba(tmp_path / "celeba")
    args = [a.replace("{root}", str(tmp_path)) for a in CONFIGS[name]]
    start = time.perf_counter()
    outcome = run_script("train.py", *args, "trainer.fast_dev_run=true", "callbacks.progress_bar.refresh_rate=0",
                         f"hydra.run.dir={tmp_path / 'run'}")
    seconds = time.perf_counter() - start
    assert outcome.code == 0, outcome.stderr[-4000:]
    metrics = json.loads((tmp_path / "run" / "final" / "metrics.json").read_text())
    if "num_episodes" in metrics:
        assert metrics["num_episodes"] == 1 and metrics["mean_length"] <= 20
    else:
        assert metrics["num_samples"] <= 8
    if name in ("cifar10", "celeba"):
        assert "Inception" in metrics["metric_skipped"] and "Quality:        skipped" in outcome.stdout
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").iterdir())
    print(f"fast_dev_run {name}: {seconds:.1f} s")
