"""One run per directory: a lock while a run writes, and no silent reuse of a finished run's directory.

`RunDirGuard` is a Hydra callback (configs/hydra/default.yaml). It runs before Hydra writes anything into the
run directory (`.hydra/`, `train.log`), so a refused run changes no file there. It refuses
- a directory whose lock another live run holds (two trainings with the same `hydra.run.dir`);
- a directory that already holds checkpoints, unless `ckpt_path=` resumes from one of them or `overwrite=true`
  (which moves the earlier run's files into a dated `replaced-<time>/` subfolder first);
- a directory that cannot be created or written.
The lock is an `flock` on `<run dir>/.lock`: the kernel releases it when the process ends, however it ends, so a
killed run never leaves a stale lock. Only the first process of a run takes it (DDP ranks > 0, which Lightning or
torchrun start in the same directory, do not).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from difflab.errors import DifflabError, RunDirError

LOCK_NAME = ".lock"
_held: dict[str, Any] = {}  # run dir -> open lock file, kept for the life of the process


def is_first_process() -> bool:
    """False in the extra processes of a distributed run (they share rank 0's directory)."""
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        value = os.environ.get(var)
        if value not in (None, "") and value.strip().lstrip("-").isdigit() and int(value) != 0:
            return False
    return True


def _inside(path: str | Path | None, directory: Path) -> bool:
    if not path:
        return False
    try:
        Path(path).expanduser().resolve().relative_to(directory.resolve())
        return True
    except ValueError:
        return False


def claim_run_dir(run_dir: str | Path, ckpt_path: str | None = None, overwrite: bool = False) -> Path:
    """Create and lock `run_dir` for this process, or raise RunDirError saying why not and what to do."""
    run_dir = Path(run_dir).expanduser()
    release_run_dir(run_dir)  # held by an earlier run in this process (in-process calls), which has ended
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / LOCK_NAME, "a+")
    except OSError as err:
        raise RunDirError(f"cannot write to the run directory {run_dir} ({err.strerror or err}): set hydra.run.dir= (or "
                          "paths.log_dir=) to a writable folder") from None
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the checkpoint check below still applies
        fcntl = None
    if fcntl is not None:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            owner = lock.read().strip() or "another process"
            lock.close()
            raise RunDirError(f"another run ({owner}) is writing to {run_dir}: wait for it to finish, or give this run its "
                              "own directory (leave hydra.run.dir at its timestamped default, or set another one)") from None
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt")) if (run_dir / "checkpoints").is_dir() else []
    if checkpoints and not overwrite and not _inside(ckpt_path, run_dir):
        lock.close()
        shown = ", ".join(checkpoints[:3]) + (f" and {len(checkpoints) - 3} more" if len(checkpoints) > 3 else "")
        latest = "last.ckpt" if "last.ckpt" in checkpoints else checkpoints[-1]
        raise RunDirError(f"{run_dir} holds the checkpoints of an earlier run ({shown}); a new run would overwrite them. "
                          f"Resume it with ckpt_path={run_dir / 'checkpoints' / latest}, use another hydra.run.dir, "
                          "or pass overwrite=true to replace them")
    if checkpoints and overwrite and not _inside(ckpt_path, run_dir):
        moved = set_aside(run_dir)
        print(f"overwrite=true: the earlier run's files in {run_dir} were moved to {moved}", file=sys.stderr, flush=True)
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    lock.flush()
    _held[str(run_dir.resolve())] = lock
    return run_dir


REPLACED_PREFIX = "replaced-"


def set_aside(run_dir: Path) -> Path:
    """Move everything an earlier run wrote in `run_dir` (checkpoints, logs, samples, .hydra) into a dated
    `replaced-<time>/` subfolder, so nothing in the directory is the other run's and nothing is lost."""
    target = run_dir / f"{REPLACED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while target.exists():
        target, n = run_dir / f"{REPLACED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{n}", n + 1
    target.mkdir()
    for entry in sorted(run_dir.iterdir()):
        if entry.name != LOCK_NAME and not entry.name.startswith(REPLACED_PREFIX) and entry != target:
            os.replace(entry, target / entry.name)
    return target


def release_run_dir(run_dir: str | Path) -> None:
    lock = _held.pop(str(Path(run_dir).expanduser().resolve()), None)
    if lock is not None:
        lock.close()  # closing the file releases the flock


def _refuse(err: DifflabError) -> None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    print(f"error: {err}", file=sys.stderr)
    sys.exit(err.exit_code)


class RunDirGuard(Callback):
    """Claims the run directory before Hydra writes into it."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_first_process():
            return
        from difflab.config_checks import check_config

        try:  # a wrong setting then leaves no empty run directory behind
            check_config(config, "train")
        except DifflabError as err:
            _refuse(err)
        run_dir = OmegaConf.select(config, "hydra.run.dir")
        # Pin the resolved name, so the job runs in exactly the directory that was claimed.
        with open_dict(config.hydra.run):
            config.hydra.run.dir = str(run_dir)
        try:
            claim_run_dir(run_dir, config.get("ckpt_path"), bool(config.get("overwrite")))
        except DifflabError as err:
            _refuse(err)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        # A sweep's jobs get their directories only now (after Hydra wrote their .hydra/); guard them here.
        if str(OmegaConf.select(config, "hydra.mode")) != "RunMode.MULTIRUN" or not is_first_process():
            return
        try:
            claim_run_dir(config.hydra.runtime.output_dir, config.get("ckpt_path"), bool(config.get("overwrite")))
        except DifflabError as err:
            _refuse(err)

    def on_job_end(self, config: DictConfig, **kwargs: Any) -> None:
        if str(OmegaConf.select(config, "hydra.mode")) == "RunMode.MULTIRUN":
            release_run_dir(config.hydra.runtime.output_dir)
