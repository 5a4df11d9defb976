"""Lightning callbacks of the project."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.trainer.states import TrainerFn

__all__ = ["LastCheckpoint", "submitit_signal"]

log = logging.getLogger(__name__)


def submitit_signal() -> signal.Signals:
    """The signal submitit treats as preemption or time-out (``SUBMITIT_PREEMPT_SIGNAL``,
    default ``USR2``; Slurm sends it ``signal_delay_s`` before the time limit)."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal, f"SIG{name}", signal.SIGUSR2)


def _is_submitit_handler(handler) -> bool:
    owner = getattr(handler, "__self__", None)
    return owner is not None and type(owner).__module__.startswith("submitit.")


class LastCheckpoint(Checkpoint):
    """``last.ckpt``: the latest training state, for resuming.

    Written at the end of every validation (after the best-checkpoint callback has
    recorded that validation, so a run resumed from it neither repeats nor skips one),
    optionally every ``every_n_train_steps`` meta-steps in between, and at the end of
    training. Lightning's own ``save_last=True`` only refreshes ``last.ckpt`` when a top-k
    checkpoint is written, so a run whose validation stops improving keeps an old one; and
    a checkpoint taken at the end of a meta-step that is followed by a validation makes
    Lightning skip that validation on resume, so such steps are left to the validation.

    In a submitit Slurm job (``hydra/launcher=submitit_slurm``), ``save_on_preemption``
    defers submitit's preemption/time-out signal (:func:`submitit_signal`) to the end of
    the current meta-step (or of the validation in progress), writes ``last.ckpt`` there,
    and then hands the signal to submitit, which requeues the job through the launcher; the
    requeued job resumes from that ``last.ckpt`` in its own run dir (``auto_resume``), so
    no meta-step is lost. Elsewhere the signal is left alone.

    Args:
        dirpath: the folder of ``last.ckpt`` (``<run dir>/checkpoints``).
        every_n_train_steps: also save every n meta-steps between validations (null: no).
        filename: the checkpoint's name without ``.ckpt``.
        save_on_preemption: save and hand over at submitit's signal, as above.
    """

    def __init__(
        self,
        dirpath: str,
        every_n_train_steps: int | None = None,
        filename: str = "last",
        save_on_preemption: bool = True,
    ) -> None:
        if every_n_train_steps is not None and (
            isinstance(every_n_train_steps, bool)
            or not isinstance(every_n_train_steps, int)
            or every_n_train_steps < 1
        ):
            raise ValueError(
                f"callbacks.last_checkpoint.every_n_train_steps={every_n_train_steps!r}; must "
                "be an integer >= 1, or null (save only after each validation and at the end)"
            )
        self.dirpath = str(dirpath)
        self.filename = filename
        self.every_n_train_steps = every_n_train_steps
        self.save_on_preemption = save_on_preemption
        self._saved_step: int | None = None
        self._signal: signal.Signals | None = None
        self._original_handler = None
        self._pending: tuple | None = None
        self._fitting = False

    @property
    def path(self) -> str:
        return os.path.join(self.dirpath, f"{self.filename}.ckpt")

    # ------------------------------------------------------------------ saving
    def _save(self, trainer: pl.Trainer) -> None:
        if trainer.global_step == self._saved_step:
            return
        if trainer.is_global_zero:
            Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(self.path)
        self._saved_step = trainer.global_step

    @staticmethod
    def _validation_follows(trainer: pl.Trainer, batch_idx: int) -> bool:
        """Whether Lightning validates right after this training batch."""
        every = trainer.val_check_batch
        return (
            trainer.enable_validation
            and isinstance(every, int)
            and every > 0
            and (batch_idx + 1) % every == 0
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._validation_follows(trainer, batch_idx):
            return  # on_validation_end saves (and hands a pending signal over)
        n = self.every_n_train_steps
        if n and trainer.global_step % n == 0:
            self._save(trainer)
        self._hand_over_if_signalled(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        self._save(trainer)
        self._hand_over_if_signalled(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)
        self._hand_over_if_signalled(trainer)

    # ------------------------------------------------------------------ preemption
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # before Lightning registers its own handlers (it restores what it found here)
        self._fitting = True
        if not self.save_on_preemption or self._signal is not None:
            return
        sig = submitit_signal()
        handler = signal.getsignal(sig)
        if _is_submitit_handler(handler):
            self._signal, self._original_handler = sig, handler
            signal.signal(sig, self._on_signal)
            log.info(
                "%s: saves %s and then requeues (through submitit) at the end of the "
                "meta-step it arrives in",
                sig.name,
                self.path,
            )

    def _on_signal(self, signum, frame) -> None:
        if self._fitting:
            log.warning(
                "received %s: saving %s at the end of this meta-step, then requeueing",
                signal.Signals(signum).name,
                self.path,
            )
            self._pending = (signum, frame)
        else:  # not training: submitit's own handling (requeue at once)
            self._original_handler(signum, frame)

    def _hand_over_if_signalled(self, trainer: pl.Trainer) -> None:
        if self._signal is None:
            return
        pending = self._pending is not None
        if trainer.world_size > 1:  # the ranks save together, so they decide together
            pending = trainer.strategy.reduce_boolean_decision(pending, all=False)
        if not pending:
            return
        self._save(trainer)
        signum, frame = self._pending or (self._signal, None)
        self._pending = None
        self._fitting = False
        log.info(
            "saved %s at meta-step %d; handing %s to submitit",
            self.path,
            trainer.global_step,
            signal.Signals(signum).name,
        )
        self._original_handler(signum, frame)  # requeues and exits on rank 0

    def _stop_deferring(self) -> None:
        self._fitting = False
        if self._signal is not None:
            signal.signal(self._signal, self._original_handler)
            self._signal = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_deferring()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._fitting = False  # a late signal goes straight to submitit
