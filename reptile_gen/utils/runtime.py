"""Checks and clean-up around a run: config validation before anything is built,
checkpoint paths and checkpoint checks (shared by train, eval and sample), and loggers
that are always finished."""

from __future__ import annotations

import logging
import math
import sys
from contextlib import contextmanager
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from reptile_gen.utils.errors import CheckpointError, ConfigError
from reptile_gen.utils.user_errors import (
    check_run_dir,
    diverged_trial_value,
    fails_non_finite_trials,
)

__all__ = [
    "LAST_CKPT",
    "CheckpointError",
    "ConfigError",
    "algorithm_class",
    "check_checkpoint_matches",
    "check_config",
    "check_no_inner_loop",
    "check_resumable",
    "finish_loggers",
    "load_checkpoint",
    "optimized_value",
    "resolve_ckpt_path",
    "restore_hydra_files_on_error",
    "RunDirSnapshot",
]

log = logging.getLogger(__name__)


def algorithm_class(algo: DictConfig) -> type:
    """The class that the ``algorithm`` node builds (``hydra.utils.get_class`` of its
    ``_target_``); a :class:`ConfigError` when it names none."""
    from hydra.utils import get_class

    target = str(algo.get("_target_", ""))
    try:
        return get_class(target)
    except Exception as err:
        raise ConfigError(
            f"algorithm._target_={target!r}: not an importable algorithm class; allowed: "
            "algorithm=maml|fomaml|reptile|joint|lstm, or a MetaLearner subclass's import path"
        ) from err


def check_config(cfg: DictConfig) -> None:
    """Cross-group checks that no single constructor can make (each constructor checks
    its own arguments), run before any training starts. What the algorithm is comes from
    its class (``display_name``, ``learns_inner_lr``, ``has_inner_loop``)."""
    from reptile_gen.utils.config_compat import explain_moved_key, moved_keys_in

    algo = cfg.algorithm
    moved = moved_keys_in(algo)
    if moved:
        value = algo.get(moved[0])
        shown = value if not isinstance(value, DictConfig) else None
        override = f"algorithm.{moved[0]}" + (f"={shown}" if shown is not None else "")
        raise ConfigError(explain_moved_key(override).removeprefix("error: "))
    cls = algorithm_class(algo)
    name = getattr(cls, "display_name", cls.__name__)
    learned = algo.get("inner_lr_learned", "none")
    if not getattr(cls, "learns_inner_lr", True) and learned not in (None, "none"):
        raise ConfigError(
            f"algorithm.inner_lr_learned={learned!r} with {name}: this "
            "algorithm gives inner learning rates no gradient; allowed: none "
            "(learned inner rates need algorithm=maml or algorithm=fomaml)"
        )
    engine = cfg.get("engine") or {}
    engine_name = engine.get("name", "functional")
    if not getattr(cls, "has_inner_loop", True):
        check_no_inner_loop(algo, name)
        if engine_name != "functional" or any(
            engine.get(k) not in (None, False) for k in engine if k != "name"
        ):
            raise ConfigError(
                f"engine={engine_name} with {name}: this algorithm has no inner loop, so no "
                "engine runs; allowed: the default engine=functional with no options"
            )
    precision = str(cfg.trainer.get("precision", "32-true"))
    if engine_name == "higher" and precision.startswith(("16", "bf16")):
        raise ConfigError(
            f"trainer.precision={precision!r} with engine=higher: higher's "
            "unroll does not support mixed precision; allowed: 32-true, 64-true"
        )
    from reptile_gen.utils.ddp import check_ddp_launch  # imports Lightning: not at the top

    check_ddp_launch(cfg)


#: MetaLearner's inner-loop options, which mean nothing to an algorithm without one
INNER_LOOP_KEYS = (
    "inner_lr",
    "inner_lr_schedule",
    "inner_lr_end_factor",
    "inner_lr_buckets",
    "inner_momentum",
    "inner_steps",
    "inner_batch_size",
    "objective",
    "eval_inner_steps",
    "checkpoint_segments",
    "truncate_steps",
    "first_order",
)


def check_no_inner_loop(algo: DictConfig, name: str = "LSTM") -> None:
    """An algorithm without an inner loop (``algorithm=lstm``) takes no inner-loop option
    (e.g. one inherited from a meta-learner's experiment): a clear error rather than an
    unexpected keyword."""
    given = [key for key in INNER_LOOP_KEYS if key in algo]
    if given:
        raise ConfigError(
            f"algorithm.{given[0]}={algo.get(given[0])!r} with {name}: "
            "this algorithm has no inner loop; remove "
            f"{', '.join('algorithm.' + k for k in given)} (allowed keys: hidden_size, "
            "num_layers, embedding_dim, dropout, eval_random_init, optimizer, scheduler)"
        )


#: where a run keeps its latest training state (``LastCheckpoint``), inside its run dir
LAST_CKPT = Path("checkpoints") / "last.ckpt"


def resolve_ckpt_path(
    ckpt_path, run_dir: str | Path | None = None, auto_resume: bool = False
) -> str | None:
    """The checkpoint a run starts from, or ``None`` for a fresh start.

    * a path: that file, which must exist;
    * ``last``: ``<run_dir>/checkpoints/last.ckpt`` of the current run dir (a run resumed
      with ``hydra.run.dir=<its dir>``), which must exist: a run that asked to resume
      never silently starts from scratch;
    * ``null``: with ``auto_resume``, ``<run_dir>/checkpoints/last.ckpt`` when the run dir
      already holds one (a re-run, or a Slurm job requeued into its own run dir, carries
      on where it stopped), else ``None``.
    """
    last = Path(run_dir) / LAST_CKPT if run_dir not in (None, "") else None
    if ckpt_path in (None, ""):
        if auto_resume and last is not None and last.is_file():
            log.info(
                "resuming from %s: the run dir already holds a last checkpoint "
                "(auto_resume=false starts from scratch instead)",
                last,
            )
            return str(last)
        return None
    if str(ckpt_path) == "last":
        if last is None:
            raise ConfigError(
                "ckpt_path='last' means the current run dir's checkpoints/last.ckpt, and this "
                "command has no run dir of its own; give the file: ckpt_path=<run dir>/"
                f"{LAST_CKPT.as_posix()}"
            )
        if not last.is_file():
            raise FileNotFoundError(
                f"ckpt_path='last': this run dir {str(run_dir)!r} has no {LAST_CKPT.as_posix()}; "
                "resume a run by giving its dir, hydra.run.dir=<that run dir> ckpt_path=last, "
                "or give a checkpoint file, ckpt_path=<run dir>/checkpoints/last.ckpt"
            )
        return str(last)
    path = Path(str(ckpt_path)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path!r}: no such checkpoint file (give the path of a .ckpt "
            "written by a run, e.g. <run dir>/checkpoints/last.ckpt, or ckpt_path=last with "
            "hydra.run.dir=<run dir>)"
        )
    return str(path)


def load_checkpoint(ckpt_path: str | Path) -> dict:
    """Read a Lightning checkpoint on the CPU; a :class:`CheckpointError` naming the file
    when it cannot be read (truncated, random bytes, not a Lightning checkpoint)."""
    import torch

    try:
        checkpoint = torch.load(str(ckpt_path), map_location="cpu", weights_only=False)
    except Exception as err:
        reason = (str(err).strip().splitlines() or [""])[0]
        raise CheckpointError(
            f"ckpt_path={str(ckpt_path)!r}: cannot read the checkpoint "
            f"({type(err).__name__}: {reason}); the file is corrupt, truncated or not a "
            "PyTorch Lightning .ckpt"
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"ckpt_path={str(ckpt_path)!r} is not a PyTorch Lightning checkpoint (it has no "
            "'state_dict'); give a .ckpt written by a run (<run dir>/checkpoints/*.ckpt)"
        )
    return checkpoint


def _shape(t) -> list[int]:
    return list(t.shape) if hasattr(t, "shape") else []


def _summary(state: dict, limit: int = 4) -> str:
    items = [f"{k} {_shape(v)}" for k, v in list(state.items())[:limit]]
    more = f", ... ({len(state)} tensors)" if len(state) > limit else ""
    return ", ".join(items) + more


def check_checkpoint_matches(
    checkpoint: dict,
    module,
    ckpt_path,
    run_config,
    hint: str = "evaluate a checkpoint with the config of the run that wrote it (its "
    "<run dir>/.hydra/config.yaml, or run_config=<that file>) and no model/task overrides",
    built_by: str | None = None,
) -> None:
    """Compare the checkpoint's tensors (names and shapes) with those of the ``module``
    built from the config ``run_config``; on mismatch a :class:`CheckpointError` naming
    both sides (a checkpoint of another task, model or algorithm) and ending in ``hint``;
    ``built_by`` names the config in the message (default: ``run_config`` with overrides).
    Differing ``hyper_parameters`` alone are fine (overrides such as
    ``algorithm.eval_inner_steps`` change them on purpose)."""
    theirs = checkpoint["state_dict"]
    ours = module.state_dict()
    missing = [k for k in ours if k not in theirs]
    unexpected = [k for k in theirs if k not in ours]
    shapes = [
        f"{k} {_shape(theirs[k])} in the checkpoint vs {_shape(ours[k])}"
        for k in ours
        if k in theirs and _shape(theirs[k]) != _shape(ours[k])
    ]
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    own_hparams = dict(getattr(module, "hparams", {}) or {})
    differing = {
        k: (hparams[k], own_hparams[k])
        for k in hparams
        if k in own_hparams and str(hparams[k]) != str(own_hparams[k])
    }
    if not (missing or unexpected or shapes):
        if differing:
            log.info("hyper-parameters changed by the overrides: %s", differing)
        return
    spec = getattr(module, "task_spec", None)
    model = getattr(module, "model", None)
    built = (
        f"task={getattr(spec, 'name', '?')}, "
        f"model={type(getattr(model, 'body', model)).__name__}, "
        f"algorithm={type(module).__name__}"
    )
    lines = [
        f"ckpt_path={str(ckpt_path)!r} does not fit the model that "
        f"{built_by or f'the config {str(run_config)!r} (with the overrides)'} builds: is "
        "it a checkpoint of another task, model or algorithm?",
        f"  the checkpoint: {_summary(theirs)}; its hyper_parameters: {hparams}",
        f"  this config: {built}: {_summary(ours)}",
    ]
    if missing:
        lines.append(f"  missing from the checkpoint: {missing[:8]}")
    if unexpected:
        lines.append(f"  in the checkpoint but not in this model: {unexpected[:8]}")
    if shapes:
        lines.append(f"  different shapes: {shapes[:8]}")
    if differing:
        lines.append(f"  hyper_parameters (checkpoint, this config): {differing}")
    lines.append(f"  {hint}")
    raise CheckpointError("\n".join(lines))


def check_resumable(checkpoint: dict, module, ckpt_path, run_config: str) -> None:
    """Checks before ``trainer.fit(ckpt_path=...)`` (``run_config`` says which config built
    ``module``, e.g. "this command's config"): the checkpoint fits the model
    (:func:`check_checkpoint_matches`) and holds a full training state whose optimizers
    are the ones this config builds (same count, same kind of settings, same number of
    parameters): otherwise Lightning fails halfway, or an Adam state lands in SGD."""
    hint = (
        "resume with the config of the run that wrote it (the same task, model and "
        "algorithm), or start afresh in a new run dir (leave out hydra.run.dir, or "
        "ckpt_path=null auto_resume=false)"
    )
    check_checkpoint_matches(
        checkpoint, module, ckpt_path, run_config, hint=hint, built_by=f"{run_config}"
    )
    states = checkpoint.get("optimizer_states")
    if not states or "loops" not in checkpoint:
        raise CheckpointError(
            f"ckpt_path={str(ckpt_path)!r} holds weights only, not a training state "
            "(no optimizer state or loop progress) and cannot be resumed; test it with "
            "train=false, or evaluate it with python -m reptile_gen.eval"
        )
    configured = module.configure_optimizers()
    if isinstance(configured, dict):
        configured = configured["optimizer"]
    ours = list(configured) if isinstance(configured, (list, tuple)) else [configured]

    def groups(state_or_optimizer) -> list[tuple[set[str], int]]:
        param_groups = (
            state_or_optimizer["param_groups"]
            if isinstance(state_or_optimizer, dict)
            else state_or_optimizer.state_dict()["param_groups"]
        )
        return [({k for k in g if k != "params"}, len(g["params"])) for g in param_groups]

    def same_kind(a: list, b: list) -> bool:
        # the same number of groups and parameters, and settings of the same optimizer:
        # one key set within the other (a newer torch adds keys; Adam and SGD share few)
        return len(a) == len(b) and all(
            na == nb and (ka <= kb or kb <= ka) for (ka, na), (kb, nb) in zip(a, b)
        )

    theirs_groups = [groups(s) for s in states]
    ours_groups = [groups(o) for o in ours]
    if len(theirs_groups) != len(ours_groups) or not all(
        same_kind(a, b) for a, b in zip(theirs_groups, ours_groups)
    ):

        def show(all_groups) -> list:
            return [[(sorted(k - {"lr", "initial_lr"}), n) for k, n in g] for g in all_groups]

        raise CheckpointError(
            f"ckpt_path={str(ckpt_path)!r}: its optimizer state does not fit the optimizers "
            f"that {run_config} builds ({[type(o).__name__ for o in ours]}); "
            f"(settings, number of parameters) per param group: checkpoint "
            f"{show(theirs_groups)} vs this config {show(ours_groups)}; {hint}"
        )


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
    NaN (a diverged trial) stays NaN where the ``FailNonFiniteTrials`` callback records it
    as a failed trial, and becomes the worst value otherwise (Hydra's Optuna sweeper ends
    the whole study on a NaN; :func:`~reptile_gen.utils.user_errors.diverged_trial_value`).
    A plain run or
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
            worst = diverged_trial_value(direction, fails_non_finite_trials())
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


class RunDirSnapshot(Callback):
    """Hydra callback (``hydra.callbacks`` in ``conf/hydra/default.yaml``): before a single
    run starts, keep the ``.hydra/`` files of its run dir when that dir already exists.

    Hydra rewrites ``.hydra/`` (config, overrides) before the task function runs, so a
    resume into an existing run dir (``hydra.run.dir=<run dir>``) whose checkpoint turns out
    to be corrupt or of another model would otherwise leave the old run's record
    overwritten by the failed command; :func:`restore_hydra_files_on_error` puts it back.
    A multirun's jobs are not covered (Hydra has no hook before it writes their files); a
    requeued job repeats its own command, so its files come out the same.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from reptile_gen.utils.user_errors import exit_if_jobs_failed

        exit_if_jobs_failed()  # a job with a user error makes the sweep exit 2

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        from omegaconf import OmegaConf

        subdir = OmegaConf.select(config, "hydra.output_subdir")
        run_dir = OmegaConf.select(config, "hydra.run.dir")
        if run_dir is not None:
            _exit_on_bad_run_dir(config, run_dir)
        if subdir is None or run_dir is None:
            return
        hydra_dir = Path(str(run_dir)) / str(subdir)
        if hydra_dir.is_dir():
            _HYDRA_FILES[Path(str(run_dir)).resolve()] = {
                p.resolve(): p.read_bytes() for p in hydra_dir.rglob("*") if p.is_file()
            }


def _exit_on_bad_run_dir(config: DictConfig, run_dir) -> None:
    """Hydra creates the run dir before any task code runs: an impossible one is a
    one-line error (exit 2) here, not a traceback from pathlib."""
    from reptile_gen.utils.user_errors import exit_on_user_error

    exit_on_user_error(check_run_dir, run_dir)


@contextmanager
def restore_hydra_files_on_error(run_dir: str | Path):
    """Run the block; if it raises, put back the ``<run_dir>/.hydra`` files that
    :class:`RunDirSnapshot` kept before Hydra rewrote them (nothing when the run dir is
    new), so a failed start leaves an existing run's record as it was."""
    try:
        yield
    except BaseException:
        saved = _HYDRA_FILES.get(Path(run_dir).resolve())
        if saved:
            for path, content in saved.items():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)
            log.info("put back the Hydra files of the existing run dir %s", run_dir)
        raise
