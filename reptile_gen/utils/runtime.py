"""Checks and clean-up around a run: config validation before anything is built,
checkpoint paths, and loggers that are always finished."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

from omegaconf import DictConfig

__all__ = ["optimized_value", "check_config", "resolve_ckpt_path", "finish_loggers", "ConfigError"]

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config value that is not allowed; the message names it and what is allowed."""


def check_config(cfg: DictConfig) -> None:
    """Cross-group checks that no single constructor can make (each constructor checks
    its own arguments), run before any training starts."""
    algo = cfg.algorithm
    target = str(algo.get("_target_", ""))
    learned = algo.get("inner_lr_learned", "none")
    gives_no_lr_gradient = target.endswith(("Reptile", "JointTraining", "LSTMBaseline"))
    if gives_no_lr_gradient and learned not in (None, "none"):
        raise ConfigError(
            f"algorithm.inner_lr_learned={learned!r} with {target.rsplit('.', 1)[-1]}: this "
            "algorithm gives inner learning rates no gradient; allowed: none "
            "(learned inner rates need algorithm=maml or algorithm=fomaml)"
        )
    if target.endswith("LSTMBaseline"):
        check_lstm_baseline_has_no_inner_loop(algo)
    if algo.get("inner_loop") == "higher" and algo.get("vmap_chunk_size") is not None:
        raise ConfigError(
            f"algorithm.vmap_chunk_size={algo.get('vmap_chunk_size')!r} with "
            "algorithm.inner_loop=higher: vmap chunks are an option of the functional "
            "engine (higher loops over tasks); allowed with higher: null"
        )
    precision = str(cfg.trainer.get("precision", "32-true"))
    if algo.get("inner_loop") == "higher" and precision.startswith(("16", "bf16")):
        raise ConfigError(
            f"trainer.precision={precision!r} with algorithm.inner_loop=higher: higher's "
            "unroll does not support mixed precision; allowed: 32-true, 64-true"
        )
    from reptile_gen.utils.ddp import check_ddp_launch  # imports Lightning: not at the top

    check_ddp_launch(cfg)


#: MetaLearner's inner-loop options, which mean nothing to the LSTM baseline
INNER_LOOP_KEYS = (
    "inner_loop",
    "inner_optimizer",
    "inner_lr",
    "inner_steps",
    "inner_batch_size",
    "objective",
    "eval_inner_steps",
    "vmap_chunk_size",
    "checkpoint_segments",
    "truncate_steps",
    "first_order",
)


def check_lstm_baseline_has_no_inner_loop(algo: DictConfig) -> None:
    """``algorithm=lstm`` takes no inner-loop option (e.g. one inherited from a
    meta-learner's experiment): a clear error rather than an unexpected keyword."""
    given = [key for key in INNER_LOOP_KEYS if key in algo]
    if given:
        raise ConfigError(
            f"algorithm.{given[0]}={algo.get(given[0])!r} with LSTMBaseline (algorithm=lstm): "
            "the LSTM baseline has no inner loop; remove "
            f"{', '.join('algorithm.' + k for k in given)} (allowed keys: hidden_size, "
            "num_layers, embedding_dim, dropout, inner_lr_learned=none, eval_random_init, "
            "optimizer, scheduler)"
        )


def resolve_ckpt_path(ckpt_path) -> str | None:
    """``None``, or an existing checkpoint file (a clear error otherwise)."""
    if ckpt_path in (None, ""):
        return None
    path = Path(str(ckpt_path)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path!r}: no such checkpoint file "
            "(give the path of a .ckpt written by a run, e.g. <run dir>/checkpoints/last.ckpt)"
        )
    return str(path)


def finish_loggers(loggers, exit_code: int | None = None) -> None:
    """Finish W&B runs even when a job fails (otherwise a multirun logs into one run).

    ``exit_code`` is what the W&B run records (non-zero marks it failed); by default it is
    1 while an exception is propagating (this is called from the ``finally`` of train and
    eval, where ``sys.exc_info()`` still holds the job's error) and 0 otherwise.
    """
    if exit_code is None:
        exit_code = 0 if sys.exc_info()[0] is None else 1
    for logger in loggers or []:
        if type(logger).__name__ == "WandbLogger":
            try:
                import wandb

                wandb.finish(exit_code=exit_code)
            except Exception as err:  # never mask the run's own error
                log.warning("could not finish the W&B run: %s", err)


def optimized_value(cfg: DictConfig, metrics: dict) -> float | None:
    """The value of ``cfg.optimized_metric`` in ``metrics`` that a Hydra sweeper
    (Optuna) minimises.

    A sweeper that optimises (any sweeper but Hydra's basic one) needs a number from every
    job: there an unset name, or one the run did not produce, is a :class:`ConfigError`
    that lists the metrics the run has (the run's own files are already written), and a
    NaN (a diverged trial) becomes the worst value (+inf when minimising, -inf when
    maximising) because the Optuna sweeper aborts the whole study on a NaN. A plain run or
    a basic ``-m`` sweep returns the value as it is, or None for an unset or missing name.
    """
    name = cfg.get("optimized_metric")
    value = metrics.get(name) if name else None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    sweeper = _optimizing_sweeper()
    if sweeper is None:
        return float(value) if number else None
    sweeper_name, direction = sweeper
    if number:
        if math.isnan(value):
            worst = -math.inf if direction == "maximize" else math.inf
            log.warning("optimized_metric=%r is NaN (diverged): %s to the sweeper", name, worst)
            return worst
        return float(value)
    available = sorted(
        k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    )
    if not name:
        problem = "is not set"
    elif name in metrics:
        problem = f"is {value!r} in this run, not a number"
    else:
        problem = "is not a metric of this run"
    raise ConfigError(
        f"optimized_metric={name!r} {problem}, but the sweeper {sweeper_name} needs one "
        f"number per job; allowed: {', '.join(available) or 'none (the run produced no metrics)'}"
    )


def _optimizing_sweeper() -> tuple[str, str] | None:
    """``(class name, direction)`` of the running Hydra sweeper when it uses the jobs'
    return values (e.g. OptunaSweeper), else None (no Hydra app, a single run, or the
    basic sweeper)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return None
        hydra_cfg = HydraConfig.get()
        target = str(hydra_cfg.sweeper.get("_target_", ""))
        direction = str(hydra_cfg.sweeper.get("direction", "minimize"))
    except Exception:  # no usable Hydra config (e.g. a config composed by hand)
        return None
    if hydra_cfg.mode != RunMode.MULTIRUN or not target or target.endswith(".BasicSweeper"):
        return None
    return target.rsplit(".", 1)[-1], direction.rsplit(".", 1)[-1]


# ---------------------------------------------------------------------- run-dir guard
#: the ``.hydra`` files an existing run dir held before this command (see RunDirSnapshot)
_HYDRA_FILES: dict[Path, dict[Path, bytes]] = {}  # run dir -> {file: content}
