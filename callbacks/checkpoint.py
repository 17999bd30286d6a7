"""ModelCheckpoint whose last.ckpt follows every validation, whose best checkpoint waits for its score, and
which saves a resumable checkpoint when the run is interrupted (Ctrl-C, or SIGTERM from a cluster's scheduler).

Lightning 2.6 writes last.ckpt only when a top-k checkpoint was written at the
same step; with a monitor such as the rollout score, which often does not
improve, last.ckpt would fall behind and a resume would lose the steps since
the last improvement.

A monitored score that is measured only at some validations (rollouts with
`callbacks.rollout.every_n_val=4`) is missing at the others; Lightning would stop
the run there. Here those validations write last.ckpt only, and a monitor that
never appears in a whole run is reported at its end.

On SIGINT or SIGTERM the current optimizer step is finished (a step cut in half would leave half-updated
weights), last.ckpt is written at that step boundary and the run stops; train.py then prints the resume
command. A second Ctrl-C stops at once without saving. Under DDP the ranks agree at the next logging step.
A signal during a validation: SIGINT lets it finish and saves at its end; SIGTERM (a scheduler's, with a
grace period) is stopped by Lightning between validation batches, and the checkpoint is written then, at the
step the validation followed, with the raw weights swapped back from the EMA ones the validation was using.
Resuming from it goes on with the next step exactly as the uninterrupted run (validations draw from their own
seeded generators, so no training stream moves); the cut validation's figures are not redone.
"""

from __future__ import annotations

import signal
import sys
import threading

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from difflab.checkpoint_io import remove_stale_temp_files
from difflab.cli import writable_dir

SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class Checkpoint(ModelCheckpoint):
    _monitor_seen = False

    def __init__(self, *args, save_on_interrupt: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.save_on_interrupt = save_on_interrupt
        self.interrupted: str | None = None  # the signal's name once one arrived
        self.interrupt_path: str | None = None  # the checkpoint written for it
        self._previous_handlers: dict = {}

    # --- the output directory is usable before any training time is spent ----------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or trainer.fast_dev_run or not self.dirpath:
            return
        if trainer.is_global_zero:
            directory = writable_dir(self.dirpath, "the checkpoint folder (callbacks.model_checkpoint.dirpath)")
            remove_stale_temp_files(directory)
        if self.save_on_interrupt:
            self._install_handlers()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_handlers()
        super().teardown(trainer, pl_module, stage)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()  # teardown hooks do not run after an exception
        if isinstance(exception, SIGTERMException) and self.interrupted is not None:
            self._save_for_interrupt(trainer)  # Lightning stopped a validation between its batches
        super().on_exception(trainer, pl_module, exception)

    def _save_for_interrupt(self, trainer: pl.Trainer) -> None:
        """last.ckpt at the current step (once), remembered as the checkpoint that the resume line names."""
        if trainer.fast_dev_run or not self.save_last or trainer.sanity_checking:
            return
        if self.interrupt_path is None:
            for callback in trainer.callbacks:  # mid-validation the module holds the EMA weights: put the raw back
                if getattr(callback, "swapped_in", False):
                    callback._swap_models(trainer.lightning_module)
            if self._last_global_step_saved != trainer.global_step or not self.last_model_path:
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self.interrupt_path = self.last_model_path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # last.ckpt is the end of training, also when the last steps came after the last validation (Lightning
        # writes it here only if no checkpoint was written at all, and even under fast_dev_run).
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if self.interrupted is not None:  # the signal came as training ended: this is the checkpoint to resume
            self._save_for_interrupt(trainer)

    # --- interrupts ---------------------------------------------------------------------------------------
    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. not inside a notebook worker)
        for sig in SIGNAL_NAMES:
            self._previous_handlers[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)

    def _restore_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, TypeError):
                pass
        self._previous_handlers = {}

    def _on_signal(self, signum, frame) -> None:
        if self.interrupted is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without saving
        self.interrupted = SIGNAL_NAMES.get(signum, str(signum))
        print(f"\n{self.interrupted} received: finishing the current step, then saving a resumable checkpoint "
              f"(Ctrl-C again to stop at once without saving)", file=sys.stderr, flush=True)
        if signum == signal.SIGTERM:
            previous = self._previous_handlers.get(signum)
            if callable(previous):  # Lightning's own handler: tells the DDP launcher's other ranks
                previous(signum, frame)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        interrupted = self.interrupted is not None
        if trainer.world_size > 1:
            # Every rank must stop at the same step and join the save; agreeing costs a collective and a device
            # sync, so only at the steps where Lightning logs (and syncs) anyway.
            if trainer.global_step % max(trainer.log_every_n_steps, 1) != 0:
                return
            interrupted = trainer.strategy.reduce_boolean_decision(interrupted, all=False)
        if not interrupted or trainer.fit_loop._should_accumulate():
            return
        self.interrupted = self.interrupted or "SIGTERM"
        self._save_for_interrupt(trainer)
        trainer.should_stop = True

    # --- best and last --------------------------------------------------------------------------------------
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        # Skipped when the parent already saved at this step (a new best, and last with it).
        if self.save_last and not self._should_skip_saving_checkpoint(trainer) and not self._should_save_on_train_epoch_end(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if self.interrupted is not None and not trainer.sanity_checking:  # a signal arrived during this validation
            self._save_for_interrupt(trainer)
            trainer.should_stop = True

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict) -> None:
        if self.monitor is not None and self.monitor not in monitor_candidates:
            return  # not measured at this validation
        self._monitor_seen = True
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (self.monitor is not None and self.save_top_k != 0 and not self._monitor_seen and not trainer.sanity_checking
                and self.interrupted is None and not trainer.fast_dev_run):
            rank_zero_warn(
                f"callbacks.model_checkpoint.monitor={self.monitor!r} was never logged in this run, so no best checkpoint "
                f"was written (last.ckpt was). Logged: {sorted(trainer.callback_metrics)}"
            )

    def state_dict(self) -> dict:
        return {**super().state_dict(), "monitor_seen": self._monitor_seen}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._monitor_seen = bool(state_dict.get("monitor_seen", False))
