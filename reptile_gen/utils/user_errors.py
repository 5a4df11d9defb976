"""One line per user error: the entry points (train, eval, sample, compare) run their
work through :func:`report_errors`, which turns an error a user can cause (a config
value, a data file, a checkpoint, a run dir) into

    error: <key>=<value>: <what is wrong>; <what is allowed>

on stderr and exit status 2, a diverged training run (see
:mod:`reptile_gen.inner_loop.core.guard`) into its one line and exit status 3, and
Ctrl-C into exit status 130. ``HYDRA_FULL_ERROR=1`` or ``verbose=true`` re-raises with
the full traceback instead.

Exit codes: 0 done, 1 a bug (traceback), 2 a user error, 3 diverged, 130 interrupted.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import sys
from collections.abc import Callable

from reptile_gen.utils.errors import Diverged, UserError

__all__ = [
    "EXIT_DIVERGED",
    "EXIT_INTERRUPTED",
    "EXIT_USER_ERROR",
    "UserError",
    "exit_if_jobs_failed",
    "exit_on_user_error",
    "quiet_console",
    "as_diverged",
    "record_divergence",
    "report_errors",
    "user_error_message",
]

log = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130

#: a message that starts by naming the value at fault: ``key=value...``
_NAMES_A_KEY = re.compile(r"^\s*[A-Za-z_+~][\w.\[\]/+-]*=")


def user_error_message(err: BaseException) -> str | None:
    """The message of ``err`` when it is a user error: a :class:`UserError`, or a
    ``ValueError``/``TypeError``/``OSError`` whose message names a key (``key=...``),
    also when wrapped by Hydra's instantiation (its cause chain is searched); else None."""
    seen = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        message = str(current).strip()
        if isinstance(current, OSError) and current.filename is not None and not message:
            message = f"{current.filename}: {current.strerror}"
        if isinstance(current, UserError):
            return message
        if isinstance(current, (ValueError, TypeError, OSError)) and _NAMES_A_KEY.match(message):
            return message
        current = current.__cause__ or current.__context__
    return None


def _sweep_direction() -> str | None:
    """None outside a Hydra multirun; else the sweeper's direction (``minimize`` or
    ``maximize``), or ``""`` for a sweeper that does not optimise (the basic one)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
            return None
        sweeper = HydraConfig.get().sweeper
        target = str(sweeper.get("_target_", ""))
    except Exception:
        return None
    if not target or target.endswith(".BasicSweeper"):
        return ""
    return str(sweeper.get("direction", "minimize")).rsplit(".", 1)[-1]


FAIL_NON_FINITE_CALLBACK = "reptile_gen.utils.optuna_trials.FailNonFiniteTrials"


def diverged_trial_value(direction: str, fails_non_finite: bool) -> float:
    """What a diverged job returns to an optimising sweeper: NaN where the multirun
    records a non-finite value as a failed trial (the ``FailNonFiniteTrials`` callback of
    the ``hparams_search`` files), else the worst value (Hydra's Optuna sweeper ends the
    whole study on a NaN)."""
    if fails_non_finite:
        return math.nan
    return -math.inf if direction == "maximize" else math.inf


def fails_non_finite_trials() -> bool:
    """Whether this Hydra run's callbacks include ``FailNonFiniteTrials``."""
    try:
        from hydra.core.hydra_config import HydraConfig

        callbacks = HydraConfig.get().callbacks or {}
        return any(
            str(c.get("_target_", "")) == FAIL_NON_FINITE_CALLBACK for c in callbacks.values()
        )
    except Exception:
        return False


#: the user errors of this process's sweep jobs (see :func:`exit_if_jobs_failed`)
FAILED_JOBS: list[str] = []


def _in_local_sweep() -> bool:
    """A multirun whose jobs run in this process (Hydra's basic launcher and sweeper)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
            return False
        hydra_cfg = HydraConfig.get()
        launcher = str((hydra_cfg.get("launcher") or {}).get("_target_", ""))
    except Exception:
        return False
    return launcher.endswith(".BasicLauncher") and _sweep_direction() == ""


def exit_if_jobs_failed() -> None:
    """At the end of a local sweep: exit with status 2 when a job had a user error
    (each already printed its line), after every job has run."""
    if FAILED_JOBS:
        failed, FAILED_JOBS[:] = len(FAILED_JOBS), []
        _say(f"error: {failed} job(s) of this sweep failed (their lines above)")
        sys.exit(EXIT_USER_ERROR)


def _verbose(args, kwargs) -> bool:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return True
    cfg = args[0] if args else kwargs.get("cfg")
    try:
        return bool(cfg.get("verbose", False))
    except Exception:
        return False


def _say(line: str) -> None:
    sys.stderr.write(line.rstrip() + "\n")
    sys.stderr.flush()
    log.debug("%s", line)


def report_errors(func: Callable) -> Callable:
    """Decorate an entry point's task function (under ``@hydra.main``): user errors,
    divergence and Ctrl-C end the process with their one line and exit status (module
    docstring); any other error propagates (a bug: Hydra prints its traceback)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        quiet_console()
        try:
            return func(*args, **kwargs)
        except KeyboardInterrupt:
            if _verbose(args, kwargs):
                raise
            _say("interrupted (Ctrl-C)")
            sys.exit(EXIT_INTERRUPTED)
        except Exception as err:
            if _verbose(args, kwargs):
                raise
            diverged = as_diverged(err)
            if diverged is not None:
                _say(f"error: {diverged}")
                in_sweep = _sweep_direction()
                if in_sweep is None:
                    sys.exit(EXIT_DIVERGED)
                # a sweep goes on: the job's metrics.json says diverged; an optimising
                # sweeper gets NaN (a failed trial) or the worst value, the basic one nothing
                if in_sweep == "":
                    return None
                return diverged_trial_value(in_sweep, fails_non_finite_trials())
            message = user_error_message(err)
            if message is None:
                raise
            _say(f"error: {message}")
            if _in_local_sweep():
                # the sweep's other jobs still run; the sweep exits 2 at its end
                FAILED_JOBS.append(message)
                return None
            sys.exit(EXIT_USER_ERROR)

    return wrapper


def record_divergence(err: BaseException, metrics_path, extra: dict | None = None) -> bool:
    """When ``err`` is (or wraps) a divergence, write ``metrics_path`` as
    ``{"status": "diverged", "diverged_at_step": ..., ...}`` (rank zero only) and return
    True; else write nothing and return False."""
    diverged = as_diverged(err)
    if diverged is None:
        return False
    from pytorch_lightning.utilities import rank_zero_only

    from reptile_gen.utils.json_io import write_json

    if rank_zero_only.rank == 0:
        write_json(metrics_path, {**(extra or {}), **diverged.as_record()})
    return True


def as_diverged(err: BaseException | None) -> Diverged | None:
    """``err`` as a divergence (:class:`~reptile_gen.utils.errors.Diverged`): itself, one
    in its cause chain, or one raised in a spawned DDP rank (which reaches the main
    process as the rank's traceback text); ``None`` for any other error."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, Diverged):
            return err
        spawned = Diverged.from_text(str(err))
        if spawned is not None:
            return spawned
        err = err.__cause__ or err.__context__
    return None


#: console lines that are known and harmless: still written to the run's train.log
QUIET_ON_CONSOLE = (
    ("py.warnings", ""),  # library deprecation warnings (Lightning, torch)
    ("", "💡 Tip:"),  # Lightning's advert for its cloud logger, once per trainer
    ("submitit", "Bypassing sacct error"),  # a Slurm without accounting, every poll
    ("alembic", ""),  # Optuna's RDB storage setting up its tables
    # Lightning's per-run notes (the seed and run dir are in the config and train.log)
    ("", "Seed set to"),
    ("", "GPU available:"),
    ("", "TPU available:"),
    ("", "`Trainer.fit` stopped:"),
    ("", "Restoring states from the checkpoint path"),
    ("", "Loaded model weights from the checkpoint"),
)


class _QuietConsole(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for name, start in QUIET_ON_CONSOLE:
            if name and not (record.name == name or record.name.startswith(name + ".")):
                continue
            if start and not str(record.msg).startswith(start):
                continue
            return False
        return True


def quiet_console() -> None:
    """Keep known harmless lines (:data:`QUIET_ON_CONSOLE`) off the console: Python
    warnings are routed through logging, and the root logger's console handlers drop
    them, while its file handler (Hydra's ``<run dir>/train.log``) keeps everything."""
    logging.captureWarnings(True)
    root = logging.getLogger()
    files = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
    for name in ("", "pytorch_lightning", "lightning_fabric", "lightning"):
        logger = logging.getLogger(name) if name else root
        for handler in logger.handlers:
            is_file = isinstance(handler, logging.FileHandler)
            if isinstance(handler, logging.StreamHandler) and not is_file:
                if not any(isinstance(f, _QuietConsole) for f in handler.filters):
                    handler.addFilter(_QuietConsole())
        # Lightning's loggers print on their own (no propagation): train.log gets them too
        if name and not logger.propagate and logger.handlers:
            for handler in files:
                if handler not in logger.handlers:
                    logger.addHandler(handler)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_run_values(cfg, training: bool = True) -> None:
    """Values that Lightning or torch would only reject deep inside (or not at all),
    checked before anything is built: ``seed``, and with ``training`` the trainer's
    step counts. A :class:`UserError` naming the key."""
    seed = cfg.get("seed")
    if seed is not None and not _is_int(seed):
        raise UserError(f"seed={seed!r}: not an integer; allowed: an integer, e.g. seed=0")
    trainer = cfg.get("trainer") or {}
    if not training or not cfg.get("train", True):
        return
    steps = trainer.get("max_steps")
    if not _is_int(steps) or steps == 0 or steps < -1:
        hint = " (to only test a checkpoint: train=false ckpt_path=<file>)" if steps == 0 else ""
        raise UserError(
            f"trainer.max_steps={steps!r}: the number of meta-steps to train; allowed: an "
            f"integer >= 1{hint}"
        )
    every = trainer.get("val_check_interval")
    if every is not None and (not _is_int(every) or every < 1):
        raise UserError(
            f"trainer.val_check_interval={every!r}: validate every this many meta-steps "
            "(the task stream has no epochs); allowed: an integer >= 1, or null (no "
            "validation during training)"
        )
    log_every = trainer.get("log_every_n_steps")
    if log_every is not None and (not _is_int(log_every) or log_every < 1):
        raise UserError(f"trainer.log_every_n_steps={log_every!r}: allowed: an integer >= 1")


def exit_on_user_error(func: Callable, *args) -> None:
    """Call ``func(*args)``; a :class:`UserError` prints its line and exits 2 (for checks
    that run outside an entry point's task function, e.g. in a Hydra callback)."""
    try:
        func(*args)
    except UserError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        _say(f"error: {err}")
        sys.exit(EXIT_USER_ERROR)


def check_run_dir(run_dir) -> None:
    """A run dir that can be created and written (checked before Hydra creates it)."""
    from pathlib import Path

    path = Path(str(run_dir)).expanduser()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    problem = None
    if probe.exists() and not probe.is_dir():
        problem = f"{str(probe)!r} is a file, not a directory"
    elif not os.access(probe, os.W_OK | os.X_OK):
        problem = f"{str(probe)!r} is not writable"
    if problem:
        raise UserError(
            f"hydra.run.dir={str(run_dir)!r}: cannot create the run dir ({problem}); "
            "allowed: a directory path you can write to"
        )
