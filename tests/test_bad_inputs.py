"""Every bad input gets one clear line, a non-zero exit and leaves the user's files as they were.

Table-driven: each case runs an entry point in-process (tests/cli_harness.py) on small real runs made once per
module, and asserts the exit code, exactly one `error:` line matching the case's pattern, no traceback, and that
no file that existed before the call changed (a refused train.py run may only write into its own new directory).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_harness import run_script, snapshot
from datamodules.replay_buffer import ReplayBuffer
from test_image_datamodules import write_fake_cifar10

QUIET = ["callbacks.quality=null", "callbacks.sample_logger=null", "callbacks.exposure_bias=null", "logger=csv",
         "callbacks.progress_bar.refresh_rate=0"]
TOY_DATA = ["data=toy2d", "data.num_train=512", "data.num_val=64", "data.batch_size=64", "net.hidden=32", "net.depth=2",
            "net.emb_dim=16", "final_eval.num_samples=16"]
TOY = [*TOY_DATA, "model.num_timesteps=20", "model.sampling.steps=5"]


def train_run(run_dir: Path, *overrides: str) -> Path:
    outcome = run_script("train.py", *QUIET, "trainer.max_steps=2", "trainer.val_check_interval=2", *overrides, f"hydra.run.dir={run_dir}")
    assert outcome.code == 0, outcome.stderr[-3000:]
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Runs and files a user has: a toy DDPM and NCSN run, an obstacle policy, and broken files beside them."""
    root = tmp_path_factory.mktemp("user_files")
    files = {"root": root}
    files["toy"] = train_run(root / "toy_run", *TOY)
    files["ncsn"] = train_run(root / "ncsn_run", *TOY_DATA, "model=ncsn", "model.num_scales=5", "model.sampling.steps=2")
    files["policy"] = train_run(root / "policy_run", "data=obstacle2d", "data.num_episodes=8", "data.batch_size=32", "callbacks.rollout=null",
                                "model.num_timesteps=10", "model.sampling.steps=2", "final_eval.num_episodes=1")
    files["bc_mse"] = train_run(root / "bc_run", "data=obstacle2d", "data.num_episodes=8", "data.batch_size=32", "callbacks.rollout=null",
                                "model=bc_mse", "final_eval.num_episodes=1")
    labelled = ["data.labels=true", "net.ch=8", "net.num_res_blocks=1", "model.num_timesteps=20", "model.sampling.steps=4",
                "final_eval.num_samples=16", "data.batch_size=64"]
    files["labelled"] = train_run(root / "labelled_run", *labelled)
    files["labelled_nodrop"] = train_run(root / "labelled_nodrop_run", *labelled, "model.cond_drop=0")
    (root / "empty.ckpt").write_bytes(b"")
    good = files["toy"].read_bytes()
    (root / "truncated.ckpt").write_bytes(good[: len(good) // 2])
    (root / "notes.ckpt").write_text("these are my notes, not a checkpoint\n")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, root / "foreign.ckpt")
    (root / "empty_zarr").mkdir()
    (root / "cifar_root").mkdir()
    write_fake_cifar10(root / "cifar" / "cifar-10-batches-py")
    steps = 40
    state = np.random.default_rng(0).uniform(0, 512, (steps, 5)).astype(np.float32)
    action = state[:, :2].copy()
    action[17, 1] = np.nan
    ReplayBuffer({"state": state, "keypoint": np.zeros((steps, 9, 2), np.float32), "action": action}, np.array([20, 40])).save(root / "nan.zarr")
    ReplayBuffer({"state": state, "keypoint": np.zeros((steps, 9, 2), np.float32), "action": state[:, :2].copy()},
                 np.array([20, 40])).save(root / "state.zarr")
    return files


def p(world, name: str) -> str:
    return str(world[name]) if name in world else str(world["root"] / name)


# (id, script, args (with {name} placeholders for the world's files), exit code, pattern of the one error line)
CASES = [
    # --- train.py: types and ranges, caught when the config is read
    ("batch_size_text", "train.py", ["data.batch_size=abc"], 2, r"data\.batch_size='abc' \(str\) is not valid: .*whole number >= 1"),
    ("batch_size_zero", "train.py", ["data.batch_size=0"], 2, r"data\.batch_size=0 is not valid"),
    ("batch_size_float", "train.py", ["data.batch_size=1.5"], 2, r"data\.batch_size=1\.5 is not valid"),
    ("timesteps_zero", "train.py", ["model.num_timesteps=0"], 2, r"model\.num_timesteps=0 is not valid"),
    ("negative_lr", "train.py", ["model.optimizer.lr=-0.001"], 2, r"model\.optimizer\.lr=-0\.001 is not valid: .*number > 0"),
    ("max_steps_zero", "train.py", ["trainer.max_steps=0"], 2, r"trainer\.max_steps=0 trains nothing"),
    ("never_stops", "train.py", ["trainer.max_steps=-1"], 2, r"never stops"),
    ("val_check_zero", "train.py", ["trainer.val_check_interval=0"], 2, r"trainer\.val_check_interval=0 is not valid"),
    ("ema_decay", "train.py", ["callbacks.ema.decay=1.5"], 2, r"callbacks\.ema\.decay=1\.5 is not valid: .*\[0, 1\)"),
    ("beta_end", "train.py", ["model.beta_end=2"], 2, r"model\.beta_end=2 is not valid"),
    ("val_fraction", "train.py", ["data.val_fraction=1.5"], 2, r"data\.val_fraction=1\.5 is not valid"),
    ("save_top_k", "train.py", ["callbacks.model_checkpoint.save_top_k=-2"], 2, r"callbacks\.model_checkpoint\.save_top_k=-2 is not valid"),
    ("cpu_threads_zero", "train.py", ["speed.cpu_threads=0"], 2, r"speed\.cpu_threads=0 is not valid: speed\.cpu_threads must be auto or a whole number >= 1"),
    ("seed_negative", "train.py", ["seed=-3"], 2, r"seed=-3 is not valid"),
    # --- train.py: values a method or datamodule refuses
    ("toy_name", "train.py", [*TOY, "data.name=spiral"], 2, r"unknown toy distribution 'spiral': data\.name must be one of"),
    ("ddpm_sampler", "train.py", [*TOY, "model.sampling.sampler=heunn"], 2, r"model\.sampling\.sampler: sampler='heunn' is not a sampler: use one of euler, heun"),
    ("bc_mse_on_digits", "train.py", ["model=bc_mse"], 2, r"bc_mse regresses actions .* needs demonstration data"),
    ("obs_keys", "train.py", ["data=obstacle2d", "data.obs_keys=[velocity]"], 2, r"data\.obs_keys=\['velocity'\]: unknown"),
    ("batch_larger_than_data", "train.py", [*TOY, "data.num_train=16", "data.batch_size=64"], 2, r"data\.batch_size=64 is larger than the training set"),
    # --- train.py: data that is missing or unusable
    ("pusht_missing", "train.py", ["data=pusht", "data.path={root}/nowhere.zarr"], 2, r"Push-T demonstrations not found.*pusht\.zip"),
    ("pusht_empty_dir", "train.py", ["data=pusht", "data.path={empty_zarr}"], 2, r"is not a replay buffer .*meta/episode_ends"),
    ("pusht_nan", "train.py", ["data=pusht", "data.path={nan.zarr}", "data.obs_keys=[state]"], 2,
     r"data/action has non-finite values in 1 of 40 rows \(first: row 17"),
    ("cifar_missing", "train.py", ["data=cifar10", "data.root={cifar_root}", "net=unet_small"], 2, r"CIFAR-10 not found.*data\.download=true"),
    # --- train.py: checkpoints to resume from
    ("resume_missing", "train.py", ["ckpt_path={root}/nope.ckpt"], 2, r"checkpoint .*nope\.ckpt does not exist"),
    ("resume_empty", "train.py", ["ckpt_path={empty.ckpt}"], 2, r"not a readable checkpoint: it is empty \(0 bytes"),
    ("resume_truncated", "train.py", ["ckpt_path={truncated.ckpt}"], 2, r"truncated\.ckpt is not a readable checkpoint \(\d+ bytes\)"),
    ("resume_text", "train.py", ["ckpt_path={notes.ckpt}"], 2, r"notes\.ckpt is not a readable checkpoint"),
    ("resume_foreign", "train.py", ["ckpt_path={foreign.ckpt}"], 2, r"was not written by this project's train\.py"),
    ("resume_without_data", "train.py", ["ckpt_path={toy}"], 2, r"trained on data=toy2d .* this run's config has data=digits: pass data=toy2d"),
    ("resume_other_model", "train.py", [*TOY_DATA, "model=ncsn", "ckpt_path={toy}"], 2, r"is a model 'lightning_modules\.ddpm\.DDPM'.*pass the same model="),
    ("resume_other_net", "train.py", [*TOY, "net.hidden=48", "ckpt_path={toy}"], 2, r"differ in net\.hidden"),
    ("resume_dir", "train.py", ["ckpt_path={root}"], 2, r"is a directory"),
    # --- train.py: run directories
    ("finished_run_dir", "train.py", [*TOY, "hydra.run.dir={root}/toy_run"], 2, r"holds the checkpoints of an earlier run .* overwrite=true"),
    ("unwritable_run_dir", "train.py", [*TOY, "hydra.run.dir=/proc/difflab_run"], 2, r"cannot write to the run directory /proc/difflab_run"),
    ("unwritable_ckpt_dir", "train.py", [*TOY, "callbacks.model_checkpoint.dirpath=/proc/difflab_ckpts"], 2,
     r"the checkpoint folder \(callbacks\.model_checkpoint\.dirpath\): /proc/difflab_ckpts cannot be written"),
    # --- train.py: a run that goes NaN (seeded: the loss turns NaN at step 4, after the good checkpoint of step 3)
    ("diverges", "train.py", [*TOY, "model.optimizer.lr=1e6", "trainer.max_steps=6", "trainer.val_check_interval=3"], 1,
     r"training diverged at step 4: the training loss first went non-finite .* the last good checkpoint is \S+/last\.ckpt \(step 3\).* Fix: lower model\.optimizer\.lr"),
    # --- train.py: FID without its weights (quality on: not QUIET)
    ("fid_weights_missing", "train.py", ["data=cifar10", "data.root={cifar}", "data.val_size=8", "net=unet_small", "data.num_workers=0",
                                         "logger=csv"], 2, r"FID needs torch-fidelity's Inception weights .* To train without FID, pass callbacks\.quality=null"),
    # --- sample.py
    ("sample_eps_scale", "sample.py", ["ckpt_path={toy}", "eps_scale=-1"], 2, r"eps_scale=-1 is not valid: .*> 0"),
    ("sample_steps_zero", "sample.py", ["ckpt_path={toy}", "steps=0"], 2, r"steps=0 is not valid"),
    ("sample_num_zero", "sample.py", ["ckpt_path={toy}", "num_samples=0"], 2, r"num_samples=0 is not valid"),
    ("sample_num_negative", "sample.py", ["ckpt_path={toy}", "num_samples=-5"], 2, r"num_samples=-5 is not valid"),
    ("sample_batch_zero", "sample.py", ["ckpt_path={toy}", "batch_size=0"], 2, r"batch_size=0 is not valid"),
    ("sample_plus_model", "sample.py", ["ckpt_path={ncsn}", "+model=ddpm"], 2, r"sample\.py does not use 'model': the method and its settings come from the checkpoint"),
    ("sample_eta_2m", "sample.py", ["ckpt_path={toy}", "sampler=dpmpp_2m", "eta=0.5"], 2, r"eta= is not an option of DDPM's sampler=dpmpp_2m \(it takes: .*\); it applies to sampler=ddim: drop eta="),
    ("sample_steps_ancestral", "sample.py", ["ckpt_path={toy}", "sampler=ancestral", "steps=10"], 2, r"steps= is not an option of DDPM's sampler=ancestral \(it takes: eps_scale, eps_scale_schedule, eps_scale_slope, guidance, guidance_rescale, rtc_max_guidance, time_shift_cutoff, time_shift_data_var, time_shift_window, variance\)"),
    ("sample_unknown_sampler", "sample.py", ["ckpt_path={toy}", "sampler=heunn"], 2, r"sampler='heunn' is not a sampler: use one of euler, heun, .* \(for DDPM\)"),
    ("sample_undefined_sampler", "sample.py", ["ckpt_path={toy}", "sampler=cm"], 2, r"sampler=cm is not defined for DDPM: cm needs a consistency function"),
    ("sample_ncsn_spacing", "sample.py", ["ckpt_path={ncsn}", "ddim_spacing=quadratic"], 2, r"ddim_spacing= is not an option of NCSN's sampler=annealed_langevin .*; no sampler of NCSN takes it"),
    ("sample_ncsn_eta", "sample.py", ["ckpt_path={ncsn}", "eta=1.0"], 2, r"eta= is not an option of NCSN's sampler=annealed_langevin .*; it applies to sampler=ddim"),
    ("sample_langevin_on_ddpm", "sample.py", ["ckpt_path={toy}", "sampler=langevin"], 2, r"sampler=langevin is not defined for DDPM: single-level Langevin is NCSN's baseline"),
    ("sample_policy", "sample.py", ["ckpt_path={policy}"], 2, r"is a policy .* evaluate\.py ckpt_path=.* metric=policy.*load_policy"),
    ("sample_no_ckpt", "sample.py", [], 2, r"ckpt_path is required: pass ckpt_path=logs/train/<run>/checkpoints/last\.ckpt"),
    ("sample_empty_ckpt", "sample.py", ["ckpt_path={empty.ckpt}"], 2, r"not a readable checkpoint: it is empty"),
    ("sample_out_unwritable", "sample.py", ["ckpt_path={toy}", "out_dir=/proc/difflab_samples"], 2, r"out_dir: /proc/difflab_samples cannot be written"),
    # --- evaluate.py
    ("eval_num_zero", "evaluate.py", ["ckpt_path={toy}", "num_samples=0"], 2, r"num_samples=0 is not valid"),
    ("eval_metric_unknown", "evaluate.py", ["ckpt_path={toy}", "metric=lpips"], 2, r"metric='lpips' is not a metric: use one of"),
    ("eval_metric_unavailable", "evaluate.py", ["ckpt_path={toy}", "metric=digits_frechet"], 2, r"metric='digits_frechet' is not available for Toy2DDataModule"),
    ("eval_undefined_sampler", "evaluate.py", ["ckpt_path={toy}", "sampler=cm"], 2, r"sampler=cm is not defined for DDPM"),
    ("eval_policy_on_toy", "evaluate.py", ["ckpt_path={toy}", "metric=policy"], 2, r"not on demonstrations: it is not a policy"),
    ("eval_toy_metric_on_policy", "evaluate.py", ["ckpt_path={policy}", "metric=sliced_w1"], 2, r"is a policy: score it with metric=policy"),
    ("eval_out_unwritable", "evaluate.py", ["ckpt_path={toy}", "out=/proc/difflab_eval/x.json"], 2, r"out: /proc/difflab_eval cannot be written"),
    ("eval_out_is_a_dir", "evaluate.py", ["ckpt_path={toy}", "out={root}"], 2, r"out=\S+ is a directory; out= names the result's JSON file"),
    ("eval_nonfinite", "evaluate.py", ["ckpt_path={toy}", "eps_scale=1e-45"], 1, r"the samples of sampler=ddim: \d+ of \d+ are NaN or inf, so nothing was written"),
    ("sample_nonfinite", "sample.py", ["ckpt_path={toy}", "eps_scale=1e-45"], 1, r"the samples of sampler=ddim \(5 NFE\): \d+ of \d+ are NaN or inf"),
    ("pusht_image_no_img", "train.py", ["experiment=pusht_image", "obs_encoder=conv_small", "data.path={state.zarr}"], 2,
     r"state\.zarr has no camera frames \(data/img\); its keys are \['action', 'keypoint', 'state'\]"),
    ("resume_other_schedule", "train.py", [*TOY, "model.schedule=cosine", "ckpt_path={toy}"], 2,
     r"was trained with model\.schedule=linear, this run has model\.schedule=cosine: that changes what the saved weights mean"),
    ("eval_search_negative", "evaluate.py", ["ckpt_path={toy}", "eps_scale_search=[1.0,-1]"], 2, r"eps_scale_search=\[1\.0, -1\] must be a list of positive scales"),
    ("eval_search_langevin", "evaluate.py", ["ckpt_path={toy}", "sampler=langevin", "eps_scale_search=[1.0,1.01]"], 2, r"sampler=langevin is not defined for DDPM"),
    ("eval_ncsn_spacing", "evaluate.py", ["ckpt_path={ncsn}", "ddim_spacing=karras"], 2, r"ddim_spacing= is not an option of NCSN's sampler=annealed_langevin"),
    ("eval_policy_eta_2m", "evaluate.py", ["ckpt_path={policy}", "metric=policy", "sampler=dpmpp_2m", "eta=0.3"], 2, r"eta= is not an option of DDPM's sampler=dpmpp_2m"),
    ("eval_bc_mse_eps_scale", "evaluate.py", ["ckpt_path={bc_mse}", "metric=policy", "eps_scale=1.01"], 2,
     r"eps_scale= is not an option of BCMSE \(sampler=direct takes nothing\): drop it"),
    ("eval_bc_mse_steps", "evaluate.py", ["ckpt_path={bc_mse}", "metric=policy", "steps=10"], 2, r"steps= is not an option of BCMSE"),
    ("sample_model_group", "sample.py", ["ckpt_path={toy}", "model=ddpm"], 2, r"sample\.py does not use 'model': the method and its settings come from the checkpoint"),
    ("eval_net_group", "evaluate.py", ["ckpt_path={toy}", "net=mlp"], 2, r"evaluate\.py does not use 'net'"),
    ("sample_label_range", "sample.py", ["ckpt_path={labelled}", "labels=12"], 2, r"labels=12: 12 is out of range; this model's classes are 0\.\.9"),
    ("sample_labels_unconditional", "sample.py", ["ckpt_path={toy}", "labels=3"], 2, r"labels=3 is for a class-conditional checkpoint; \S+ was trained without labels"),
    ("sample_guidance_no_dropout", "sample.py", ["ckpt_path={labelled_nodrop}", "guidance=2"], 2,
     r"guidance= contrasts the condition with a learned null condition, which this DDPM was trained without: retrain with model\.cond_drop=0\.1"),
    ("sample_guidance_negative", "sample.py", ["ckpt_path={labelled}", "guidance=-1"], 2, r"guidance=-1 is not valid: a number >= 0"),
    ("sample_guidance_unconditional", "sample.py", ["ckpt_path={toy}", "guidance=2"], 2, r"guidance= needs a conditional model"),
    ("sample_guide_other_data", "sample.py", ["ckpt_path={labelled}", "guide_ckpt={toy}", "guidance=2"], 2,
     r"guide_ckpt=\S+ was trained on data=toy2d \(labels=None\), this checkpoint on data=digits \(labels=True\)"),
    ("sample_guide_without_scale", "sample.py", ["ckpt_path={labelled}", "guide_ckpt={labelled_nodrop}"], 2, r"needs a scale: pass guidance=w"),
    ("labels_not_bool", "train.py", ["data.labels=maybe"], 2, r"data\.labels='maybe' \(str\) is not valid: data\.labels must be true or false"),
    ("cond_drop_text", "train.py", ["data.labels=true", "model.cond_drop=abc"], 2, r"model\.cond_drop='abc' \(str\) is not valid"),
    ("cond_drop_one", "train.py", ["data.labels=true", "model.cond_drop=1.5"], 2, r"model\.cond_drop=1\.5 is not valid: model\.cond_drop must be a number in \[0, 1\)"),
    ("train_cond_drop_unconditional", "train.py", [*TOY, "model.cond_drop=0.1"], 2, r"model\.cond_drop needs a conditional model"),
    ("eval_plus_model", "evaluate.py", ["ckpt_path={toy}", "+model=ddpm"], 2, r"evaluate\.py does not use 'model'"),
    ("eval_missing_ckpt", "evaluate.py", ["ckpt_path={root}/nope.ckpt"], 2, r"nope\.ckpt does not exist"),
]


@pytest.mark.parametrize("name,script,args,code,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_line_and_changes_nothing(world, tmp_path, monkeypatch, name, script, args, code, pattern):
    args = [re.sub(r"\{([^}]+)\}", lambda m: p(world, m.group(1)), a) for a in args]
    if script == "train.py" and not any(a.startswith("hydra.run.dir=") for a in args):
        args.append(f"hydra.run.dir={tmp_path / 'refused_run'}")
    before = snapshot(world["root"])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no cached Inception weights
    monkeypatch.delenv("DIFFLAB_INCEPTION", raising=False)
    quiet = QUIET if script == "train.py" and name not in ("fid_weights_missing",) else []
    outcome = run_script(script, *quiet, *args)
    assert outcome.code == code, f"exit {outcome.code}, stderr:\n{outcome.stderr[-3000:]}"
    assert "Traceback" not in outcome.stderr + outcome.stdout, outcome.stderr[-3000:]
    assert len(outcome.error_lines) == 1, f"want one error line, got:\n{outcome.stderr[-3000:]}"
    assert re.search(pattern, outcome.error_lines[0]), outcome.error_lines[0]
    after = snapshot(world["root"])
    changed = {k for k in before if after.get(k) != before[k]}
    assert not changed, f"{name} changed the user's files {sorted(changed)}"


def test_the_table_covers_the_issue(world):
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


def test_debug_shows_the_traceback_of_a_user_error(world):
    outcome = run_script("sample.py", f"ckpt_path={world['toy']}", "steps=0", "debug=true")
    assert outcome.code != 0 and "Traceback" in outcome.stderr and "ConfigError" in outcome.stderr


def test_default_sample_folders_of_two_checkpoints_of_a_run_do_not_collide(world, tmp_path):
    """Issue 32: sample.py without out_dir wrote best's and last's samples to one folder."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(Path(world["toy"]).parent.parent, run, ignore=shutil.ignore_patterns(".lock"))
    last = run / "checkpoints" / "last.ckpt"
    shutil.copy(last, run / "checkpoints" / "best_step0000002.ckpt")
    for name in ("last", "best_step0000002"):
        outcome = run_script("sample.py", f"ckpt_path={run / 'checkpoints' / (name + '.ckpt')}", "num_samples=4", "progress=false")
        assert outcome.code == 0, outcome.stderr[-2000:]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["best_step0000002_ddim_5nfe", "last_ddim_5nfe"]


def test_export_cli_writes_a_loadable_folder_and_refuses_what_lerobot_cannot_express(world, tmp_path, capsys):
    from envs.export import load_exported, main

    folder = main([str(world["policy"]), str(tmp_path / "ours")])
    assert load_exported(folder).n_action_steps >= 1
    with pytest.raises(SystemExit) as stop:
        main([str(world["policy"]), str(tmp_path / "lr"), "--format", "lerobot"])
    assert stop.value.code == 2 and not (tmp_path / "lr").exists()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "needs observation.environment_state" in lines[0]
