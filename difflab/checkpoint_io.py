"""Checkpoint writes that never destroy the last good checkpoint, and never store non-finite weights.

Lightning's own save stages the file in $TMPDIR and moves it into place; when $TMPDIR is on another filesystem
(node-local /tmp, shared home: usual on clusters) the move is a copy, and a kill during it leaves a truncated
`last.ckpt`. Here the file is written next to its destination, flushed and fsynced, then renamed over it with
`os.replace`, which is atomic within one filesystem: a reader sees the old checkpoint or the new one, never part
of one. A kill leaves at most a `.<name>.tmp-<pid>` file beside it, which `remove_stale_temp_files` clears at the
next start.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from difflab.errors import CheckpointError, TrainingDiverged

TEMP_MARK = ".tmp-"


def temp_path(path: Path) -> Path:
    return path.parent / f".{path.name}{TEMP_MARK}{os.getpid()}"


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save into a temp file in the same directory, fsync, then rename over `path` (and fsync the directory,
    so the rename itself survives a power cut)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        cause = write_failure(err)
        if cause is not None:
            raise CheckpointError(f"could not write the checkpoint {path}: {cause}; the previous {path.name} (if any) is "
                                  "whole. Free disk space or point paths.log_dir (or hydra.run.dir) at a writable place, "
                                  "then resume from it") from None
        raise
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path  # directories cannot be opened on some platforms; the file itself is synced
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
    return path


def write_failure(err: BaseException) -> str | None:
    """Why a save failed, when it failed writing: an OSError, or torch's zip writer's RuntimeError ("[enforce fail
    at inline_container.cc] unexpected pos"), into which torch turns the ENOSPC of a full disk."""
    seen, exc = set(), err
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return f"{exc.strerror or exc} (errno {exc.errno})" if exc.errno else str(exc)
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    if isinstance(err, RuntimeError) and "inline_container" in str(err):
        return "the file could not be written to the end (a full disk, or a quota)"
    return None


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Temp files of saves that were killed; safe to delete once this run holds the directory's lock."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.glob(f".*.ckpt{TEMP_MARK}*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def nonfinite_weights(checkpoint: dict) -> list[str]:
    """Names of weight tensors (EMA `state_dict` and raw `current_model_state`) holding NaN or inf."""
    bad = []
    for part in ("state_dict", "current_model_state"):
        tensors = {k: v for k, v in (checkpoint.get(part) or {}).items() if torch.is_tensor(v) and v.is_floating_point()}
        if not tensors:
            continue
        finite = torch.stack([torch.isfinite(v).all() for v in tensors.values()]).cpu()  # one device sync
        bad += [f"{part}.{k}" for k, ok in zip(tensors, finite.tolist()) if not ok]
    return bad


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic, finite-only checkpoint writes; remembers the last checkpoint written, for the divergence message."""

    def __init__(self) -> None:
        super().__init__()
        self.last_saved: tuple[Path, int] | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("SafeCheckpointIO does not take storage_options")
        path = Path(path)
        bad = nonfinite_weights(checkpoint)
        if bad:
            raise TrainingDiverged(divergence_message(self, f"the weights hold non-finite values ({bad[0]}"
                                                            f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''})",
                                                      int(checkpoint.get("global_step", -1))))
        atomic_torch_save(checkpoint, path)
        self.last_saved = (path, int(checkpoint.get("global_step", -1)))


def divergence_message(io: SafeCheckpointIO | None, what: str, step: int, resumed_from: str | None = None) -> str:
    if io is not None and io.last_saved is not None:
        path, good_step = io.last_saved
        good = f"the last good checkpoint is {path} (step {good_step}); resume from it with ckpt_path={path}"
    elif resumed_from:
        good = f"no checkpoint was written in this run; the one it resumed from is {resumed_from}"
    else:
        good = "no checkpoint had been written yet"
    return (f"training diverged at step {step}: {what}. No checkpoint with non-finite weights was written; {good}. "
            "Fix: lower model.optimizer.lr, keep trainer.gradient_clip_val set (1.0), or use trainer.precision=32-true "
            "if bf16/fp16 overflowed")
