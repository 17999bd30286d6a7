"""NCSN and the score SDEs through train.py and sample.py with tiny settings, as a user runs them."""

import json

import numpy as np
import pytest

from conftest import run_cli

TOY = [
    "data=toy2d", "trainer.max_steps=20", "trainer.val_check_interval=10", "final_eval.num_samples=200",
    "callbacks.quality.num_samples=100", "callbacks.sample_logger.num_samples=50",
]
# per model: tiny sampler settings and the NFE they cost (VP's reverse-diffusion chain needs > 20 steps)
FAST = {
    "ncsn": (["model.num_scales=4", "model.sampling.steps=3"], 4 * 3 + 1),
    "vesde": (["model.sampling.steps=10"], 10 * 2 + 1),
    "vpsde": (["model.sampling.steps=25"], 25 * 2 + 1),
    "subvpsde": (["model.sampling.steps=25", "model.sampling.sampler=ode"], 25 * 2 + 1),
}
# sample.py with another sampler than the model's default: (sampler, steps, NFE; None = only known afterwards)
OTHER_SAMPLER = {
    "ncsn": ("langevin", 7, 7),
    "vesde": ("ode_adaptive", None, None),
    "vpsde": ("euler_maruyama", 8, 9),
    "subvpsde": ("pc", 30, 61),
}


@pytest.mark.slow
@pytest.mark.parametrize("model", list(FAST))
def test_toy_run_trains_samples_and_resamples_from_its_checkpoint(model, tmp_path):
    overrides, nfe = FAST[model]
    run_dir = tmp_path / "run"
    run_cli("train.py", f"model={model}", *TOY, *overrides, f"hydra.run.dir={run_dir}")
    metrics = json.loads((run_dir / "final" / "metrics.json").read_text())
    assert metrics["metric"] == "sliced_w1" and np.isfinite(metrics["value"]) and metrics["nfe"] == nfe
    assert metrics["global_step"] == 20

    sampler, steps, nfe = OTHER_SAMPLER[model]
    out = tmp_path / "samples"
    args = [f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "num_samples=30", f"sampler={sampler}", f"out_dir={out}"]
    run_cli("sample.py", *args, *([f"steps={steps}"] if steps else []))
    data = np.load(out / "samples.npz")
    assert data["samples"].shape == (30, 2) and np.isfinite(data["samples"]).all()
    assert int(data["nfe"]) == nfe if nfe is not None else int(data["nfe"]) > 1
    assert (out / "samples.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("model,overrides", [("ncsn", ["model.objective=ssm", "model.num_scales=3", "model.sampling.steps=2"]), ("vpsde", ["model.sampling.sampler=ode", "model.sampling.steps=4"])])
def test_digits_run_trains_and_samples_images(model, overrides, tmp_path):
    run_cli(
        "train.py", f"model={model}", *overrides, "net.ch=16", "net.num_res_blocks=1", "data.batch_size=32",
        "trainer.max_steps=4", "trainer.val_check_interval=2", "callbacks.sample_logger.num_samples=4",
        "callbacks.quality.num_samples=64", "final_eval.num_samples=64", f"hydra.run.dir={tmp_path}",
    )
    metrics = json.loads((tmp_path / "final" / "metrics.json").read_text())
    assert metrics["metric"] == "digits_frechet" and np.isfinite(metrics["value"]) and metrics["global_step"] == 4
    samples = np.load(tmp_path / "final" / "samples.npz")["samples"]
    assert samples.shape == (64, 1, 8, 8) and samples.min() >= 0 and samples.max() <= 16  # clip_denoised from data=digits
    ckpt = f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"
    # likelihood of held-out digits through the probability-flow ODE of the method's denoiser (NCSN's too)
    out = tmp_path / "bpd.json"
    run_cli("evaluate.py", ckpt, "metric=bpd", "num_samples=8", "batch_size=8", f"out={out}")
    result = json.loads(out.read_text())
    # dequantised over 17 levels, a near-untrained model sits well above 0 and below ~30 bits/dim
    assert result["metric"] == "bpd" and result["num_levels"] == 17 and 0 < result["value"] < 30
    assert result["num_samples"] == 8 and result["nfe"] > 2
