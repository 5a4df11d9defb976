"""Lightning callbacks of the project."""

from __future__ import annotations

import csv
import logging
import os
import signal
import time
from pathlib import Path

import pytorch_lightning as pl
from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.callbacks import Checkpoint, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter as _CSVWriter
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_only

__all__ = ["AppendingCSVLogger", "LastCheckpoint", "StepProgressBar", "submitit_signal"]

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
        save_on_interrupt: at Ctrl-C (SIGINT, single-process runs) save ``last.ckpt``
            when the meta-step in progress has ended (its metrics logged) and exit with
            status 130; the same command resumes from there. A second Ctrl-C stops at
            once.

    The callback's state (in every checkpoint) is the run's training ``segments``
    (meta-steps and seconds of each start), which ``metrics.json`` reports.
    """

    def __init__(
        self,
        dirpath: str,
        every_n_train_steps: int | None = None,
        filename: str = "last",
        save_on_preemption: bool = True,
        save_on_interrupt: bool = True,
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
        self._trainer_ref = None
        self.save_on_interrupt = save_on_interrupt
        self._interrupted = False
        self._stop_pending = False
        self._sigint_handler = None
        #: finished training segments: ``{"from_step", "to_step", "fit_seconds"}`` each
        self.segments: list[dict] = []
        self._segment_start: tuple[int, float] | None = None

    @property
    def path(self) -> str:
        return os.path.join(self.dirpath, f"{self.filename}.ckpt")

    # ------------------------------------------------------------------ saving
    def _save(self, trainer: pl.Trainer) -> None:
        if trainer.global_step == self._saved_step:
            return
        if trainer.is_global_zero:
            Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        for logger in trainer.loggers:  # what was logged up to here survives a kill
            logger.save()
        trainer.save_checkpoint(self.path, weights_only=False)
        self._saved_step = trainer.global_step

    # ------------------------------------------------------------------ segments
    def current_segments(self, trainer: pl.Trainer | None = None) -> list[dict]:
        """The training segments so far, the one in progress (up to ``trainer``'s
        global step) included: a resumed run lists the segments before its resume."""
        if self._segment_start is None:
            return list(self.segments)
        step, started = self._segment_start
        to_step = trainer.global_step if trainer is not None else step
        now = {
            "from_step": step,
            "to_step": to_step,
            "fit_seconds": round(time.perf_counter() - started, 3),
        }
        return [*self.segments, now]

    def state_dict(self) -> dict:
        return {"segments": self.current_segments(self._trainer_ref)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.segments = list(state_dict.get("segments", []))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer_ref = trainer
        # segments recorded after the checkpoint we resumed from did not happen
        self.segments = [s for s in self.segments if s["to_step"] <= trainer.global_step]
        self._segment_start = (trainer.global_step, time.perf_counter())
        for logger in trainer.loggers:
            if hasattr(logger, "resume_at"):
                logger.resume_at(trainer.global_step)

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
        if self._interrupted:  # saved at the end of this meta-step; stop at the next start
            self._save(trainer)
            self._stop_pending = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # the interrupted meta-step's metrics are logged by now: keep them, then stop
        if self._stop_pending:
            self._exit_interrupted(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        self._save(trainer)
        self._hand_over_if_signalled(trainer)
        self._stop_if_interrupted(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)
        self._hand_over_if_signalled(trainer)
        self._restore_sigint()

    # ------------------------------------------------------------------ Ctrl-C
    def _install_sigint(self, trainer: pl.Trainer) -> None:
        import threading

        if (
            not self.save_on_interrupt
            or trainer.world_size > 1
            or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        ):
            return
        self._interrupted = self._stop_pending = False
        self._sigint_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame) -> None:
        if self._interrupted:  # a second Ctrl-C: stop at once
            self._restore_sigint()
            raise KeyboardInterrupt
        self._interrupted = True
        log.warning(
            "Ctrl-C: saving %s at the end of this meta-step (again to stop at once)", self.path
        )

    def _restore_sigint(self) -> None:
        if self._sigint_handler is not None:
            signal.signal(signal.SIGINT, self._sigint_handler)
            self._sigint_handler = None

    def _stop_if_interrupted(self, trainer: pl.Trainer) -> None:
        if self._interrupted:
            self._save(trainer)
            self._exit_interrupted(trainer)

    def _exit_interrupted(self, trainer: pl.Trainer) -> None:
        for logger in trainer.loggers:
            logger.save()
        self._restore_sigint()
        import sys

        sys.stderr.write(
            f"interrupted at meta-step {trainer.global_step}: saved {self.path}; the same "
            "command resumes from it\n"
        )
        sys.stderr.flush()
        raise SystemExit(130)

    # ------------------------------------------------------------------ preemption
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # before Lightning registers its own handlers (it restores what it found here)
        self._fitting = True
        self._install_sigint(trainer)
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
        self._restore_sigint()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._fitting = False  # a late signal goes straight to submitit
        self._restore_sigint()


# ---------------------------------------------------------------------- appending CSV log
class _AppendingWriter(_CSVWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is kept and
    appended to (its header is read back) instead of being deleted."""

    def _check_log_dir_exists(self) -> None:
        path = self.metrics_file_path
        if self._fs.isfile(path):
            with self._fs.open(path, "r", newline="") as file:
                header = next(csv.reader(file), [])
            self.metrics_keys = sorted(header)

    def drop_rows_from(self, step: int) -> int:
        """Remove the rows logged at meta-step ``step`` or later (they will be logged
        again by a run resumed from a checkpoint of that step), except test rows; returns
        how many were removed."""
        path = self.metrics_file_path
        if not self._fs.isfile(path):
            return 0
        with self._fs.open(path, "r", newline="") as file:
            rows = list(csv.DictReader(file))

        def keep(row: dict) -> bool:
            if step > 0 and any(
                k.startswith("test/") and row.get(k) not in ("", None) for k in row
            ):
                return True
            try:
                return int(float(row.get("step") or 0)) < step
            except ValueError:
                return True

        kept = [row for row in rows if keep(row)]
        if len(kept) != len(rows):
            with self._fs.open(path, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)
        return len(rows) - len(kept)


class AppendingCSVLogger(CSVLogger):
    """``pytorch_lightning.loggers.CSVLogger`` (same arguments) whose ``metrics.csv``
    survives a resume or a re-run into the same run dir: rows are appended, and a run
    resumed from a checkpoint of meta-step ``g`` first drops the rows of steps ``>= g``
    (written after that checkpoint, and about to be logged again), so the file holds
    every step once, as an uninterrupted run's would. :class:`LastCheckpoint` flushes
    the buffered rows at every save, so a killed run loses none logged before its last
    checkpoint."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _CSVWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def resume_at(self, step: int) -> None:
        self.experiment.save()
        dropped = self.experiment.drop_rows_from(step)
        if dropped:
            log.info(
                "metrics.csv: dropped %d rows after meta-step %d (logged again)", dropped, step
            )


# ---------------------------------------------------------------------- progress bar
class StepProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar counting meta-steps: ``global_step / max_steps``, also after
    a resume (the endless task stream has no length, and a resumed epoch restarts its
    batch count)."""

    def on_train_epoch_start(self, trainer: pl.Trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        if bar is None or trainer.max_steps is None or trainer.max_steps < 0:
            return
        bar.total = trainer.max_steps
        bar.initial = bar.n = trainer.global_step
        bar.last_print_n = trainer.global_step
        bar.set_description("meta-step")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        shown = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith("val/") and not k.endswith("_ci95")
        }
        if shown:  # one line per validation, on the console and in train.log
            text = ", ".join(f"{k}={v:.4g}" for k, v in sorted(shown.items()))
            log.info("meta-step %d: %s", trainer.global_step, text)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if bar is None or trainer.max_steps is None or trainer.max_steps < 0:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        n = trainer.global_step
        if self._should_update(n, bar.total):
            bar.n = n
            bar.refresh()
            bar.set_postfix(self.get_metrics(trainer, pl_module))


def fit_record(trainer: pl.Trainer, fit_seconds: float) -> dict:
    """What ``metrics.json`` says about training time: ``fit_seconds`` summed over every
    segment of the run (a killed and resumed run counts its time before the last
    checkpoint too) and the ``segments`` history (from :class:`LastCheckpoint`; without
    it, only this process's ``fit_seconds``)."""
    last = next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)
    segments = last.current_segments(trainer) if last is not None else []
    if not segments:
        return {"fit_seconds": round(fit_seconds, 2)}
    if len(segments) == 1:
        segments[0]["fit_seconds"] = round(fit_seconds, 3)
    total = sum(s["fit_seconds"] for s in segments)
    return {"fit_seconds": round(total, 2), "segments": segments}
