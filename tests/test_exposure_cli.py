"""The exposure-bias figure end to end: logged at validation, and `evaluate.py metric=exposure_bias`."""

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import run_cli


@pytest.mark.slow
def test_exposure_bias_is_logged_and_evaluated(tmp_path):
    run_dir = tmp_path / "run"
    run_cli("train.py", "data=toy2d", "trainer.max_steps=20", "trainer.val_check_interval=10", "model.sampling.steps=5",
            "final_eval.num_samples=100", "callbacks.quality.num_samples=100", "callbacks.exposure_bias.num_samples=64",
            f"hydra.run.dir={run_dir}")
    assert sorted(p.name for p in (run_dir / "exposure").glob("*.png")) == ["step_0000010.png", "step_0000020.png"]
    events = EventAccumulator(str(next((run_dir / "tensorboard").rglob("events*")).parent))
    events.Reload()
    assert "exposure/delta_sum" in events.Tags()["scalars"] and "quality/sliced_w1" in events.Tags()["scalars"]
    assert "exposure/curve" in events.Tags()["images"]

    out = tmp_path / "eb.json"
    proc = run_cli("evaluate.py", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "metric=exposure_bias", "sampler=ddim",
                   "steps=5", "num_samples=64", f"out={out}", "progress=false")
    result = json.loads(out.read_text())
    assert len(result["per_step"]["t"]) == 5 and result["nfe"] == 5  # one entry per visited step
    assert result["value"] == pytest.approx(sum(result["per_step"]["delta"]), rel=1e-9)
    assert "quality" in result and "quality beside it" in proc.stdout  # never the gap alone
    assert out.with_suffix(".png").exists()

    search = tmp_path / "search.json"
    run_cli("evaluate.py", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "eps_scale_search=[1.0,1.05]", "sampler=ddim",
            "steps=5", "num_samples=64", f"out={search}", "progress=false")
    result = json.loads(search.read_text())
    assert result["scales"] == [1.0, 1.05] and len(set(result["values"])) == 2  # the scale changes the samples
    assert result["best_value"] == min(result["values"]) and result["baseline_value"] == result["values"][0]

    # the few-step solver options through evaluate.py: DPM-Solver++(2M) on the quadratic grid, measured the same way
    solver = tmp_path / "solver.json"
    run_cli("evaluate.py", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "metric=exposure_bias", "sampler=dpmpp_2m",
            "steps=5", "ddim_spacing=quadratic", "num_samples=64", f"out={solver}", "progress=false")
    result = json.loads(solver.read_text())
    T = 1000  # data=toy2d keeps model.num_timesteps
    assert result["nfe"] == 5 and result["sampler"] == "dpmpp_2m"
    assert [round(t) for t in result["per_step"]["t"]] == [round((T - 1) * (1 - k / 4) ** 2) for k in range(5)]
    proc = run_cli("evaluate.py", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "sampler=dpmpp_2m", "steps=5",
                   "time_shift_window=3", "num_samples=64", f"out={tmp_path / 'bad.json'}", "progress=false", check=False)
    assert proc.returncode == 2 and "not an option of DDPM's sampler=dpmpp_2m" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_exposure_bias_refuses_methods_without_a_discrete_schedule(tmp_path):
    run_dir = tmp_path / "run"
    run_cli("train.py", "model=edm", "data=toy2d", "trainer.max_steps=4", "trainer.val_check_interval=4", "model.sampling.steps=2",
            "final_eval.num_samples=32", "callbacks.quality.num_samples=32", f"hydra.run.dir={run_dir}")
    assert not (run_dir / "exposure").exists()
    proc = run_cli("evaluate.py", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "metric=exposure_bias", check=False)
    assert proc.returncode != 0 and "needs a DDPM-family checkpoint" in proc.stderr + proc.stdout
