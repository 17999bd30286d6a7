"""train.py and sample.py end to end with tiny settings, as a user runs them; resume restores every state."""

import copy
import json
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from callbacks.ema import EMA
from conftest import run_cli
from datamodules.toy2d import Toy2DDataModule
from lightning_modules.checkpoint import check_compatible, load_module, read_checkpoint
from lightning_modules.ddpm import DDPM
from lightning_modules.lr_schedules import warmup_constant
from lightning_modules.nets import MLP

TINY = [
    "net.ch=16", "net.num_res_blocks=1", "model.num_timesteps=50", "model.sampling.steps=5",
    "data.batch_size=32", "callbacks.sample_logger.num_samples=4", "callbacks.quality.num_samples=64",
    "final_eval.num_samples=64", "trainer.log_every_n_steps=1",
]


def event_tags(run_dir: Path) -> tuple[set, set]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(run_dir.rglob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file under {run_dir}"
    scalars, images = set(), set()
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
        images |= set(acc.Tags()["images"])
    return scalars, images


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("digits_run")
    proc = run_cli("train.py", *TINY, "trainer.max_steps=6", "trainer.val_check_interval=3", f"hydra.run.dir={run_dir}")
    return run_dir, proc


@pytest.mark.slow
def test_short_run_leaves_checkpoints_events_samples_and_a_quality_number(digits_run):
    run_dir, proc = digits_run
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "checkpoints").glob("best_step*.ckpt"))
    scalars, images = event_tags(run_dir)
    assert {"train/loss", "val/loss", "quality/digits_frechet", "final/digits_frechet"} <= scalars
    assert any(tag.startswith("lr-") for tag in scalars)
    assert {"samples", "final/samples"} <= images
    assert (run_dir / "final" / "samples.png").is_file()
    metrics = json.loads((run_dir / "final" / "metrics.json").read_text())
    assert metrics["metric"] == "digits_frechet" and metrics["value"] > 0 and metrics["floor"] > 0
    assert metrics["global_step"] == 6 and metrics["nfe"] == 5
    samples = np.load(run_dir / "final" / "samples.npz")["samples"]
    assert samples.shape == (64, 1, 8, 8) and samples.min() >= 0 and samples.max() <= 16  # digits' own 0..16 scale
    assert "tensorboard --logdir" in proc.stdout and "Quality:" in proc.stdout


@pytest.mark.slow
def test_resume_continues_at_the_right_step(digits_run, tmp_path):
    run_dir, _ = digits_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    run_cli("train.py", *TINY, "trainer.max_steps=9", "trainer.val_check_interval=3", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path}")
    resumed = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 9
    assert resumed["optimizer_states"][0]["state"][0]["step"].item() == 9


@pytest.mark.slow
@pytest.mark.parametrize("sampler,steps,nfe", [("ddim", 5, 5), ("ancestral", None, 50)])
def test_sample_py_writes_npz_and_png(digits_run, tmp_path, sampler, steps, nfe):
    run_dir, _ = digits_run
    args = [f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "num_samples=10", f"sampler={sampler}", f"out_dir={tmp_path}"]
    run_cli("sample.py", *args, *([f"steps={steps}"] if steps else []))
    data = np.load(tmp_path / "samples.npz")
    assert data["samples"].shape == (10, 1, 8, 8) and int(data["nfe"]) == nfe
    assert (tmp_path / "samples.png").is_file()


@pytest.mark.slow
def test_toy2d_run_logs_scatter_and_sliced_wasserstein(tmp_path):
    run_cli(
        "train.py", "data=toy2d", "data.name=moons", "trainer.max_steps=20", "trainer.val_check_interval=10",
        "model.num_timesteps=50", "model.sampling.steps=5", "final_eval.num_samples=500", "callbacks.quality.num_samples=200",
        "callbacks.sample_logger.num_samples=100", f"hydra.run.dir={tmp_path}",
    )
    metrics = json.loads((tmp_path / "final" / "metrics.json").read_text())
    assert metrics["metric"] == "sliced_w1" and metrics["value"] > metrics["floor"] > 0
    assert np.load(tmp_path / "final" / "samples.npz")["samples"].shape == (500, 2)
    _, images = event_tags(tmp_path)
    assert "samples" in images


# --- resume restores optimizer, LR schedule, EMA, step and RNG (in-process, to look inside) ------------------


class CaptureAtStart(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMA))
        self.step = trainer.global_step
        self.current = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.ema = {k: v.clone() for k, v in ema._average_model.module.state_dict().items()}
        self.optimizer = copy.deepcopy(trainer.optimizers[0].state_dict())
        self.lr_step = trainer.lr_scheduler_configs[0].scheduler.last_epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # the module restores the RNG in its on_train_start, right before the first resumed step draws from it
        if not hasattr(self, "torch_rng"):
            self.torch_rng = torch.get_rng_state()


def toy_model():
    net = MLP((2,), hidden=32, depth=2, emb_dim=16)
    return DDPM(net, partial(torch.optim.Adam, lr=1e-3), partial(warmup_constant, warmup_steps=100), data_shape=(2,), num_timesteps=50)


def toy_trainer(tmp_path, max_steps, callbacks):
    return pl.Trainer(
        default_root_dir=tmp_path, max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks,
    )


def test_resume_restores_weights_ema_optimizer_schedule_and_rng(tmp_path):
    pl.seed_everything(0)
    data = Toy2DDataModule("8gaussians", num_train=512, num_val=64, batch_size=64)
    model = toy_model()
    model.run_config = {"note": "in-process test"}
    # The checkpoint a run leaves (written during training: after fit() the module already holds the EMA weights).
    checkpointing = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True, every_n_train_steps=7)
    toy_trainer(tmp_path, 7, [EMA(decay=0.99), checkpointing]).fit(model, datamodule=data)
    ckpt_path = tmp_path / "ckpts" / "last.ckpt"
    saved = torch.load(ckpt_path, weights_only=False)

    capture = CaptureAtStart()
    pl.seed_everything(123)  # a different RNG state, which resuming must overwrite
    toy_trainer(tmp_path, 8, [EMA(decay=0.99), capture]).fit(toy_model(), datamodule=data, ckpt_path=ckpt_path)

    assert capture.step == 7 and capture.lr_step == 7
    for key, value in saved["current_model_state"].items():  # the raw (non-averaged) weights
        torch.testing.assert_close(capture.current[key], value, rtol=0, atol=0)
    for key, value in saved["state_dict"].items():  # Lightning stores the EMA weights as the state_dict
        torch.testing.assert_close(capture.ema[key], value, rtol=0, atol=0)
    assert any((saved["state_dict"][k] != saved["current_model_state"][k]).any() for k in saved["state_dict"])
    assert capture.optimizer["state"][0]["step"].item() == 7
    torch.testing.assert_close(capture.optimizer["state"][0]["exp_avg"], saved["optimizer_states"][0]["state"][0]["exp_avg"])
    assert torch.equal(capture.torch_rng, saved["rng_states"]["torch"])


def test_checkpoint_of_another_model_or_not_ours_is_refused(digits_run, tmp_path):
    from omegaconf import OmegaConf

    run_dir, _ = digits_run
    ckpt = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    cfg = OmegaConf.create(ckpt["difflab"]["config"])
    check_compatible(ckpt, cfg, "same")  # its own config is fine
    other = cfg.copy()
    other.model._target_ = "lightning_modules.ncsn.NCSN"
    with pytest.raises(ValueError, match="pass the same model="):
        check_compatible(ckpt, other, "x.ckpt")
    wider = cfg.copy()
    wider.net.ch = 64
    with pytest.raises(ValueError, match="net settings"):
        check_compatible(ckpt, wider, "x.ckpt")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="not written by this project"):
        read_checkpoint(foreign)
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "missing.ckpt")


@pytest.mark.parametrize("key,value", [("schedule", "cosine"), ("num_timesteps", 500), ("prediction", "v")])
def test_resume_refuses_a_model_setting_that_changes_what_the_weights_mean(digits_run, key, value):
    run_dir, _ = digits_run
    ckpt = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    cfg = OmegaConf.create(ckpt["difflab"]["config"])
    before = cfg.model[key]
    cfg.model[key] = value
    with pytest.raises(ValueError, match=rf"model\.{key}={before}, this run has model\.{key}={value}"):
        check_compatible(ckpt, cfg, "x.ckpt")


def test_resume_accepts_optimizer_scheduler_and_sampling_edits(digits_run):
    run_dir, _ = digits_run
    ckpt = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    cfg = OmegaConf.create(ckpt["difflab"]["config"])
    cfg.model.optimizer.lr = 1e-5
    cfg.model.scheduler.warmup_steps = 7
    cfg.model.sampling.sampler, cfg.model.sampling.steps, cfg.model.sampling.options.eta = "ancestral", 3, 0.5
    check_compatible(ckpt, cfg, "x.ckpt")


def test_loaded_checkpoint_samples_with_the_ema_weights(digits_run):
    run_dir, _ = digits_run
    ckpt_path = run_dir / "checkpoints" / "last.ckpt"
    module, ckpt = load_module(ckpt_path)
    for key, value in ckpt["state_dict"].items():
        torch.testing.assert_close(module.state_dict()[key], value)
    assert any((ckpt["state_dict"][k] != ckpt["current_model_state"][k]).any() for k in ckpt["state_dict"])
    assert module.sample(3, steps=2).shape == (3, 1, 8, 8)


@pytest.mark.slow
def test_evaluate_py_writes_the_figure_with_floor_nfe_and_speed(digits_run, tmp_path):
    run_dir, _ = digits_run
    out = tmp_path / "eval.json"
    proc = run_cli("evaluate.py", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "num_samples=400", "sampler=ddim", "steps=3", f"out={out}")
    result = json.loads(out.read_text())
    assert result["metric"] == "digits_frechet" and result["num_samples"] == 400 and result["nfe"] == 3
    assert result["value"] > result["floor"] > 0 and result["samples_per_second"] > 0 and result["sampling_seconds"] > 0
    assert "digits_frechet =" in proc.stdout
    bad = run_cli("evaluate.py", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "metric=sliced_w1", check=False)
    assert bad.returncode != 0 and "not available" in bad.stderr
