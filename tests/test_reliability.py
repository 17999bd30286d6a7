"""Nothing a user made is lost: atomic checkpoint writes under a kill, no NaN checkpoint, one run per directory,
a resumable checkpoint on Ctrl-C / SIGTERM, and resume that is bitwise the uninterrupted run."""

from __future__ import annotations

import errno
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from callbacks.checkpoint import Checkpoint
from callbacks.ema import EMA
from cli_harness import ROOT, run_script
from datamodules.toy2d import Toy2DDataModule
from difflab.checkpoint_io import SafeCheckpointIO, remove_stale_temp_files
from difflab.errors import CheckpointError, RunDirError, TrainingDiverged
from difflab.run_dir import claim_run_dir, release_run_dir
from lightning_modules.ddpm import DDPM
from lightning_modules.lr_schedules import warmup_constant
from lightning_modules.nets import MLP

QUIET = ["logger=csv", "callbacks.progress_bar.refresh_rate=0"]
TOY = ["data=toy2d", "data.num_train=640", "data.num_val=64", "data.batch_size=64", "net.hidden=32", "net.depth=2",
       "net.emb_dim=16", "model.num_timesteps=20", "model.sampling.steps=4", "final_eval.num_samples=16",
       "callbacks.quality.num_samples=32", "callbacks.sample_logger.num_samples=16", "callbacks.exposure_bias.num_samples=16"]


# --- a kill during a save -----------------------------------------------------------------------------------

SAVER = textwrap.dedent("""
    import os, sys, time, torch
    from difflab.checkpoint_io import SafeCheckpointIO
    io = SafeCheckpointIO()
    path = sys.argv[1]
    io.save_checkpoint({"state_dict": {"w": torch.ones(4)}, "global_step": 1}, path)
    os.fsync = lambda fd: time.sleep(600)          # the next save hangs after writing, before the rename
    print("saving", flush=True)
    io.save_checkpoint({"state_dict": {"w": torch.full((1_000_000,), 2.0)}, "global_step": 2}, path)
""")


def other_filesystem_dir(tmp_path: Path) -> Path:
    """A TMPDIR on another filesystem than tmp_path when there is one (/dev/shm), else beside it."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != tmp_path.stat().st_dev:
        d = shm / f"difflab_tmp_{os.getpid()}"
        d.mkdir(exist_ok=True)
        return d
    d = tmp_path / "tmpdir"
    d.mkdir()
    return d


def test_a_kill_during_a_save_leaves_the_last_checkpoint_whole(tmp_path):
    run = tmp_path / "checkpoints"
    run.mkdir()
    tmpdir = other_filesystem_dir(tmp_path)
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(run / "last.ckpt")], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "saving"
        deadline = time.time() + 60
        while not list(run.glob(".last.ckpt.tmp-*")) and time.time() < deadline:
            time.sleep(0.05)
        temps = list(run.glob(".last.ckpt.tmp-*"))
        assert temps, "the save should stage its file next to last.ckpt"
        time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    survivor = torch.load(run / "last.ckpt", weights_only=True)  # the old checkpoint, whole
    assert survivor["global_step"] == 1 and torch.equal(survivor["state_dict"]["w"], torch.ones(4))
    assert not any(tmpdir.iterdir()), f"the save staged data in TMPDIR: {list(tmpdir.iterdir())}"
    assert remove_stale_temp_files(run) == temps and not list(run.glob(".*tmp-*"))
    if tmpdir.parent == Path("/dev/shm"):
        tmpdir.rmdir()


def test_a_failed_save_is_an_error_and_leaves_no_temp_file(tmp_path, monkeypatch):
    io = SafeCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(1)}, "global_step": 3}, target)

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="could not write the checkpoint .*last.ckpt: No space left on device"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(1)}, "global_step": 4}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True)["global_step"] == 3 and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


class FillsUp(io.FileIO):
    """A file on a disk with `room` bytes left: writes past it fail with ENOSPC, as the kernel's would."""

    room = 2000

    def write(self, data):
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def test_a_full_disk_during_a_run_is_one_line_naming_the_checkpoint_and_the_old_one_stays(tmp_path, monkeypatch):
    """torch's zip writer turns ENOSPC into `RuntimeError: [enforce fail at inline_container.cc] unexpected pos`;
    the user gets one line that names the file and the cause, and last.ckpt from before is whole."""
    import difflab.checkpoint_io as checkpoint_io

    common = [*QUIET, *TOY, "seed=3", "trainer.val_check_interval=5", f"hydra.run.dir={tmp_path}"]
    assert run_script("train.py", *common, "trainer.max_steps=5").code == 0
    saved = tmp_path / "checkpoints" / "last.ckpt"
    before = saved.read_bytes()
    monkeypatch.setattr(checkpoint_io, "open", lambda path, mode: FillsUp(path, mode), raising=False)
    full = run_script("train.py", *common, "trainer.max_steps=10", f"ckpt_path={saved}")
    assert full.code == 2, full.stderr[-2000:]
    assert "Traceback" not in full.stderr and len(full.error_lines) == 1, full.stderr[-2000:]
    assert re.search(r"could not write the checkpoint \S+\.ckpt: No space left on device .*Free disk space", full.error_lines[0])
    assert saved.read_bytes() == before and not list((tmp_path / "checkpoints").glob(".*tmp-*"))


# --- a run that goes NaN ------------------------------------------------------------------------------------

class PoisonAt(pl.Callback):
    """Sets one weight to NaN after optimizer step `step`, as a diverging run would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.net.parameters()).view(-1)[0] = float("nan")


def toy_model():
    net = MLP((2,), hidden=32, depth=2, emb_dim=16)
    model = DDPM(net, partial(torch.optim.Adam, lr=1e-3), partial(warmup_constant, warmup_steps=10), data_shape=(2,),
                 num_timesteps=20, sampling={"steps": 4})
    model.run_config = {"note": "in-process test"}
    return model


def test_a_run_that_goes_nan_keeps_its_last_good_checkpoint_and_names_it(tmp_path):
    pl.seed_everything(0)
    data = Toy2DDataModule("8gaussians", num_train=640, num_val=64, batch_size=64)
    ckpt = Checkpoint(dirpath=tmp_path / "checkpoints", filename="best_step{step:07d}", monitor="val/loss", save_last=True,
                      auto_insert_metric_name=False)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=30, val_check_interval=5, check_val_every_n_epoch=None,
                         log_every_n_steps=50, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, plugins=[SafeCheckpointIO()], callbacks=[EMA(decay=0.9), PoisonAt(step=7), ckpt])
    with pytest.raises(TrainingDiverged) as err:
        trainer.fit(toy_model(), datamodule=data)
    message = str(err.value)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert "training diverged at step 8" in message and f"the last good checkpoint is {last} (step 5)" in message
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 5
    for part in ("state_dict", "current_model_state"):
        assert all(torch.isfinite(v).all() for v in saved[part].values() if v.is_floating_point())
    best = list((tmp_path / "checkpoints").glob("best_step*.ckpt"))
    assert [p.name for p in best] == ["best_step0000005.ckpt"]


def test_a_checkpoint_with_nonfinite_weights_is_never_written(tmp_path):
    io = SafeCheckpointIO()
    with pytest.raises(TrainingDiverged, match=r"non-finite values \(current_model_state\.w"):
        io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "current_model_state": {"w": torch.tensor([1.0, float("inf")])},
                            "global_step": 9}, tmp_path / "last.ckpt")
    assert not list(tmp_path.iterdir())


# --- one run per directory ----------------------------------------------------------------------------------

HOLDER = "import sys, time; from difflab.run_dir import claim_run_dir; claim_run_dir(sys.argv[1]); print('held', flush=True); time.sleep(600)"


def test_a_live_run_locks_its_directory_and_a_killed_one_leaves_no_stale_lock(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match=rf"another run \(pid {proc.pid} on .*\) is writing to {run}"):
            claim_run_dir(run)
    finally:
        proc.kill()
        proc.wait()
    claim_run_dir(run)  # kill -9 released the lock with the process
    release_run_dir(run)


def test_a_finished_run_directory_is_refused_unless_resumed_or_overwritten(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(RunDirError, match=r"holds the checkpoints of an earlier run \(last\.ckpt\)"):
        claim_run_dir(tmp_path)
    claim_run_dir(tmp_path, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    claim_run_dir(tmp_path, overwrite=True)
    release_run_dir(tmp_path)


def test_overwrite_moves_the_earlier_run_aside_so_no_file_is_the_other_runs(tmp_path):
    old = {"checkpoints/last.ckpt": b"old last", "checkpoints/best_step0000005.ckpt": b"old best",
           "tensorboard/version_0/events.out.tfevents.1": b"old events", "final/metrics.json": b"{}", ".hydra/config.yaml": b"a: 1"}
    for name, content in old.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    claim_run_dir(tmp_path, overwrite=True)
    release_run_dir(tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and ".lock" in left and left[1 - left.index(".lock")].startswith("replaced-"), left
    aside = next(tmp_path.glob("replaced-*"))
    assert {name: (aside / name).read_bytes() for name in old} == old


# --- interrupts and exact resume ----------------------------------------------------------------------------

class InterruptAt(pl.Callback):
    """Sends this process `signum` during optimizer step `step` (as Ctrl-C or a scheduler's SIGTERM would)."""

    def __init__(self, step: int, signum: int = signal.SIGINT):
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), self.signum)


def final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    out = {f"ema/{k}": v for k, v in ckpt["state_dict"].items()} | {f"raw/{k}": v for k, v in ckpt["current_model_state"].items()}
    for i, state in ckpt["optimizer_states"][0]["state"].items():
        out |= {f"adam/{i}/{k}": v for k, v in state.items()}
    out["rng"] = ckpt["rng_states"]["torch"]
    return out


def assert_bitwise(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


DATA = {
    "toy2d": TOY,
    "digits": ["data=digits", "net.ch=8", "net.num_res_blocks=1", "model.num_timesteps=20", "model.sampling.steps=4",
               "final_eval.num_samples=16", "callbacks.quality.num_samples=16", "callbacks.sample_logger.num_samples=4",
               "callbacks.exposure_bias.num_samples=16", "data.batch_size=64"],
    "obstacle2d": ["data=obstacle2d", "data.num_episodes=12", "data.batch_size=64", "model.num_timesteps=20", "model.sampling.steps=4",
                   "callbacks.rollout.num_episodes=2", "final_eval.num_episodes=1"],
}


@pytest.mark.parametrize("data", sorted(DATA))
def test_resume_mid_epoch_is_bitwise_the_uninterrupted_run(tmp_path, data):
    """12 steps straight against 5 + resume: validations (with every sampling callback on) at 5 and 10; step 5
    is mid-epoch on every dataset here."""
    common = [*QUIET, *DATA[data], "seed=7", "trainer.max_steps=12", "trainer.val_check_interval=5", "trainer.log_every_n_steps=1"]
    assert run_script("train.py", *common, f"hydra.run.dir={tmp_path / 'straight'}").code == 0
    first = run_script("train.py", *common, "trainer.max_steps=5", f"hydra.run.dir={tmp_path / 'first'}")
    assert first.code == 0, first.stderr[-2000:]
    resumed = run_script("train.py", *common, f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}",
                         f"hydra.run.dir={tmp_path / 'resumed'}")
    assert resumed.code == 0, resumed.stderr[-2000:]
    assert_bitwise(final_tensors(tmp_path / "straight"), final_tensors(tmp_path / "resumed"))


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupt_saves_at_the_step_boundary_and_the_printed_command_resumes_exactly(tmp_path, signum, code):
    common = [*QUIET, *TOY, "seed=3", "trainer.max_steps=12", "trainer.val_check_interval=5"]
    assert run_script("train.py", *common, f"hydra.run.dir={tmp_path / 'straight'}").code == 0
    interrupted = run_script("train.py", *common, f"hydra.run.dir={tmp_path / 'cut'}", "+callbacks.cut._target_=test_reliability.InterruptAt",
                             "+callbacks.cut.step=7", f"+callbacks.cut.signum={int(signum)}")
    assert interrupted.code == code, interrupted.stderr[-2000:]
    name = signal.Signals(signum).name
    saved = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    assert f"Interrupted ({name}) at step 7; saved {saved}" in interrupted.stderr
    assert torch.load(saved, weights_only=True)["global_step"] == 7
    assert not (tmp_path / "cut" / "final").exists()  # no final figure for a cut run
    command = interrupted.stderr.split("Resume with:")[1].strip().splitlines()[0]
    args = [a for a in shlex.split(command)[2:] if not a.startswith("+callbacks.cut")]
    assert f"ckpt_path={saved}" in args and f"hydra.run.dir={tmp_path / 'cut'}" in args
    resumed = run_script("train.py", *args)
    assert resumed.code == 0, resumed.stderr[-2000:]
    assert_bitwise(final_tensors(tmp_path / "straight"), final_tensors(tmp_path / "cut"))


class InterruptDuringValidation(pl.Callback):
    """Sends this process `signum` while the validation after optimizer step `step` runs (between its batches, where
    Lightning's evaluation loop stops on SIGTERM)."""

    def __init__(self, step: int, signum: int = signal.SIGTERM, batch: int = 1):
        self.step, self.signum, self.batch = step, signum, batch

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking and trainer.global_step == self.step and batch_idx == self.batch:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupt_during_a_validation_saves_and_resumes_exactly(tmp_path, signum, code):
    """A scheduler's SIGTERM between validation batches: the step before it is saved, the message says where, and
    the resumed run (which redoes that validation) is bitwise the uninterrupted one."""
    common = [*QUIET, *TOY, "data.num_val=256", "seed=5", "trainer.max_steps=12", "trainer.val_check_interval=5"]
    assert run_script("train.py", *common, f"hydra.run.dir={tmp_path / 'straight'}").code == 0
    interrupted = run_script("train.py", *common, f"hydra.run.dir={tmp_path / 'cut'}",
                             "+callbacks.cut._target_=test_reliability.InterruptDuringValidation", "+callbacks.cut.step=10",
                             f"+callbacks.cut.signum={int(signum)}")
    assert interrupted.code == code, interrupted.stderr[-2000:]
    saved = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    assert f"Interrupted ({signal.Signals(signum).name}) at step 10; saved {saved}" in interrupted.stderr, interrupted.stderr[-2000:]
    assert "no checkpoint was saved" not in interrupted.stderr
    assert torch.load(saved, weights_only=True)["global_step"] == 10
    command = interrupted.stderr.split("Resume with:")[1].strip().splitlines()[0]
    args = [a for a in shlex.split(command)[2:] if not a.startswith("+callbacks.cut")]
    resumed = run_script("train.py", *args)
    assert resumed.code == 0, resumed.stderr[-2000:]
    assert_bitwise(final_tensors(tmp_path / "straight"), final_tensors(tmp_path / "cut"))


# --- CPU threads ----------------------------------------------------------------------------------------------

def test_cpu_threads_auto_keeps_a_small_machine_to_one_thread_and_leaves_a_core_on_a_large_one(monkeypatch):
    from train import cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for cores, processes, want in ((1, 1, 1), (2, 1, 1), (4, 1, 3), (16, 1, 15), (4, 2, 1), (16, 2, 7)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert cpu_threads("auto", processes) == want, (cores, processes)
    assert cpu_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu_threads("auto") is None  # the user's own setting wins


# --- the soak: five SIGTERMs at random moments, five resumes ------------------------------------------------

class Pace(pl.Callback):
    """Slows a tiny run to a few seconds (sleeps change no number) and marks that training began, so that a kill
    lands in training steps and validations rather than in the interpreter's start-up."""

    def __init__(self, marker: str, seconds: float = 0.04):
        self.marker, self.seconds = Path(marker), seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.marker.write_text("training")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.seconds)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.marker.write_text("validation")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        time.sleep(self.seconds)


@pytest.mark.slow
def test_soak_five_sigterms_at_random_moments_end_bitwise_equal_to_the_uninterrupted_run(tmp_path):
    import random

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    marker = tmp_path / "started"
    common = [*QUIET, *TOY, "data.num_val=512", "seed=11", "trainer.max_steps=60", "trainer.val_check_interval=6",
              "+callbacks.pace._target_=test_reliability.Pace", f"+callbacks.pace.marker={marker}"]

    def launch(*args: str) -> subprocess.Popen:
        marker.unlink(missing_ok=True)
        return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *common, *args], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    straight = launch(f"hydra.run.dir={tmp_path / 'straight'}")
    assert straight.wait(timeout=600) == 0, straight.stderr.read()[-2000:]
    run, last = tmp_path / "cut", tmp_path / "cut" / "checkpoints" / "last.ckpt"
    rng, kills, steps, phases = random.Random(2026), 0, [], []
    while kills < 5:
        proc = launch(f"hydra.run.dir={run}", *([f"ckpt_path={last}"] if last.exists() else []))
        while not marker.exists() and proc.poll() is None:
            time.sleep(0.01)
        if kills == 0:  # the first one surely mid-validation, the others wherever they fall
            while proc.poll() is None and (not marker.exists() or marker.read_text() != "validation"):
                time.sleep(0.01)
        else:
            time.sleep(rng.uniform(0.0, 3.0))
        phases.append(marker.read_text() if marker.exists() else "?")
        proc.send_signal(signal.SIGTERM)
        code, err = proc.wait(timeout=600), proc.stderr.read()
        assert "Traceback" not in err, err[-3000:]
        if code == 0:  # it finished before the signal: nothing left to interrupt
            break
        assert code == 143, err[-3000:]
        assert "Resume with:" in err and "no checkpoint was saved" not in err, err[-3000:]
        steps.append(torch.load(last, weights_only=True)["global_step"])
        kills += 1
    if kills == 5:
        final = launch(f"hydra.run.dir={run}", f"ckpt_path={last}")
        assert final.wait(timeout=600) == 0, final.stderr.read()[-2000:]
    assert kills >= 3, f"only {kills} interrupts landed before the run ended (at steps {steps})"
    assert phases[0] == "validation", phases
    assert steps == sorted(steps), steps
    assert_bitwise(final_tensors(tmp_path / "straight"), final_tensors(run))
