"""Every option the sampler registry declares reaches the sampler from sample.py and evaluate.py (issue 33's design
step: no hand-kept list of options; `key=value` pairs go to the `options` dict and `check_sampling` is the only
check). Each case is compared with `module.sample_many` called with the same option and seed: equal samples prove
the option arrived, and a typo is refused by the method's own check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_harness import run_script
from lightning_modules.checkpoint import instantiate_datamodule, load_module

TOY = ["data=toy2d", "data.num_train=512", "data.num_val=64", "data.batch_size=64", "net.hidden=32", "net.depth=2",
       "net.emb_dim=16", "final_eval.num_samples=16", "model.num_timesteps=20", "model.sampling.steps=4",
       "callbacks.quality=null", "callbacks.sample_logger=null", "callbacks.exposure_bias=null", "logger=csv",
       "callbacks.progress_bar.refresh_rate=0", "trainer.max_steps=2", "trainer.val_check_interval=2"]

# (sampler, option, value as typed, value as the sampler gets it): every option of every registry sampler that runs
# on a DDPM, and the DDPM's own (ddim_spacing, eps_scale, time_shift_window)
CASES = [
    ("heun", "s_churn", "1.5", 1.5), ("heun", "s_tmin", "0.05", 0.05), ("heun", "s_tmax", "3.0", 3.0), ("heun", "s_noise", "1.01", 1.01),
    ("dpmpp_2m", "min_ratio", "0.9", 0.9), ("dpmpp_2m", "lower_order_final", "true", True),
    ("dpmpp_2m", "ddim_spacing", "quadratic", "quadratic"),
    ("ode_adaptive", "rtol", "0.001", 0.001), ("ode_adaptive", "atol", "0.001", 0.001),
    ("ddim", "eta", "0.7", 0.7), ("ddim", "eps_scale", "1.02", 1.02), ("ddim", "time_shift_window", "2", 2),
    ("ddim", "eps_scale_slope", "0.001", 0.001), ("ddim", "time_shift_cutoff", "3", 3),
    ("ancestral", "variance", "posterior", "posterior"),
    ("pc", "snr", "0.05", 0.05), ("pc", "n_corrector_steps", "2", 2),
    ("annealed_langevin", "n_steps_each", "3", 3), ("annealed_langevin", "step_lr", "1e-05", 1e-05),
]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    run = tmp_path_factory.mktemp("sampling_cli")
    outcome = run_script("train.py", *TOY, f"hydra.run.dir={run}")
    assert outcome.code == 0, outcome.stderr[-3000:]
    ckpt = run / "checkpoints" / "last.ckpt"
    module, _ = load_module(ckpt)
    return ckpt, module, instantiate_datamodule(module.run_config)


def steps_for(module, sampler: str) -> list[str]:
    return [] if sampler in module.fixed_grid else ["steps=3"]


@pytest.mark.parametrize("sampler,option,typed,value", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_every_registry_option_reaches_the_sampler_from_sample_py(toy, tmp_path, sampler, option, typed, value):
    ckpt, module, datamodule = toy
    assert option in module.allowed_options(sampler)
    outcome = run_script("sample.py", f"ckpt_path={ckpt}", "num_samples=8", f"sampler={sampler}", *steps_for(module, sampler),
                         f"{option}={typed}", f"out_dir={tmp_path}", "progress=false")
    assert outcome.code == 0, outcome.stderr[-3000:]
    steps = None if sampler in module.fixed_grid else 3
    want = module.sample_many(8, 1024, torch.Generator().manual_seed(0), sampler=sampler, steps=steps, **{option: value})
    np.testing.assert_array_equal(np.load(tmp_path / "samples.npz")["samples"], datamodule.unnormalize(want).numpy())


@pytest.mark.parametrize("sampler,option,typed,value", [CASES[0], CASES[13]], ids=["heun-s_churn", "pc-snr"])
def test_evaluate_py_takes_them_too_and_names_the_file_by_them(toy, tmp_path, sampler, option, typed, value):
    ckpt, module, _ = toy
    out = tmp_path / "eval.json"
    outcome = run_script("evaluate.py", f"ckpt_path={ckpt}", "num_samples=64", f"sampler={sampler}", "steps=3",
                         f"{option}={typed}", f"out={out}", "progress=false")
    assert outcome.code == 0, outcome.stderr[-3000:]
    assert json.loads(out.read_text())["nfe"] == module.nfe(sampler, 3, **{option: value})
    default = run_script("evaluate.py", f"ckpt_path={ckpt}", "num_samples=64", f"sampler={sampler}", "steps=3", f"{option}={typed}",
                         "progress=false")
    assert default.code == 0 and f"_{option}-{typed}" in default.stdout.split("->")[-1]


def test_an_option_no_sampler_of_the_method_takes_is_refused_by_the_methods_check(toy):
    ckpt, _, _ = toy
    outcome = run_script("sample.py", f"ckpt_path={ckpt}", "sampler=heun", "s_chrun=40")
    assert outcome.code == 2 and len(outcome.error_lines) == 1
    assert "s_chrun= is not an option of DDPM's sampler=heun (it takes: " in outcome.error_lines[0]
    wrong = run_script("evaluate.py", f"ckpt_path={ckpt}", "sampler=ddim", "snr=0.1")
    assert wrong.code == 2 and "snr= is not an option of DDPM's sampler=ddim" in wrong.error_lines[0]
    assert "it applies to sampler=pc" in wrong.error_lines[0]


def test_autoguidance_from_the_command_line_with_the_model_as_its_own_guide_changes_nothing_but_the_nfe(toy, tmp_path):
    """guide_ckpt= loads the guide; guided by itself, D + w (D - D) = D: the unguided samples at twice the NFE."""
    ckpt, module, datamodule = toy
    args = [f"ckpt_path={ckpt}", "num_samples=8", "sampler=ddim", "steps=3", "progress=false"]
    assert run_script("sample.py", *args, f"out_dir={tmp_path / 'plain'}").code == 0
    guided = run_script("sample.py", *args, f"guide_ckpt={ckpt}", "guidance=3", f"out_dir={tmp_path / 'guided'}")
    assert guided.code == 0, guided.stderr[-3000:]
    plain, auto = np.load(tmp_path / "plain" / "samples.npz"), np.load(tmp_path / "guided" / "samples.npz")
    np.testing.assert_array_equal(auto["samples"], plain["samples"])
    assert int(auto["nfe"]) == 2 * int(plain["nfe"]) == 6
