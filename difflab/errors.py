"""The project's error types: a known user error, printed by the entry points as one line with no traceback.

Each subclasses the builtin it refines (ValueError, FileNotFoundError, ...), so code that catches the builtin
keeps working. The message says what is wrong and how to fix it; `HYDRA_FULL_ERROR=1` or `debug=true` shows the
traceback too.
"""

from __future__ import annotations


class DifflabError(Exception):
    """A known user error (bad setting, missing file, unusable checkpoint): one line, what is wrong and the fix."""

    exit_code = 2


class ConfigError(DifflabError, ValueError):
    """A setting has a wrong type or value, or names an option the chosen method does not have."""


class DataError(DifflabError, ValueError):
    """Data that is there but unusable: non-finite values, a file that is not the expected format."""


class MissingFileError(DifflabError, FileNotFoundError):
    """A dataset, weights file or checkpoint that is not where the settings say."""


class CheckpointError(DifflabError, ValueError):
    """A checkpoint that cannot be read, or does not fit this run, or cannot be written."""


class RunDirError(DifflabError, RuntimeError):
    """A run directory that another run is using, that holds a finished run's checkpoints, or is not writable."""


class TrainingDiverged(DifflabError, FloatingPointError):
    """The loss or the weights went non-finite; no checkpoint with non-finite weights was written."""

    exit_code = 1


def user_error(exc: BaseException | None) -> DifflabError | None:
    """The DifflabError behind an exception, looking through wrappers that chain it as their cause (Hydra's
    InstantiationException does); an error raised while handling another is not its wrapper."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, DifflabError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__
    return None


class NonFiniteResult(DifflabError, FloatingPointError):
    """Samples or a figure came out NaN or inf: an error, never a result (nothing is written for it)."""

    exit_code = 1


SAMPLER_DIVERGED = ("the sampler diverged on this checkpoint: try another sampler= or more steps=, or a smaller step option "
                    "(step_lr=, step_size=, snr=)")


def require_finite(x, what: str, fix: str) -> None:
    """Raise NonFiniteResult when the tensor (or float) `x` holds NaN or inf; `what` names it, `fix` says what to do."""
    import math

    import torch

    if torch.is_tensor(x):
        bad = x.numel() - int(torch.isfinite(x).sum()) if x.numel() else 0
        if bad:
            rows = int((~torch.isfinite(x.reshape(x.shape[0], -1))).any(1).sum()) if x.ndim > 1 else bad
            raise NonFiniteResult(f"{what}: {rows} of {x.shape[0]} are NaN or inf, so nothing was written for them; {fix}")
    elif x is not None and not math.isfinite(float(x)):
        raise NonFiniteResult(f"{what} is {float(x)}, so nothing was written for it; {fix}")
