"""Train a meta-learner: ``python -m reptile_gen.train [overrides]`` (``reptile-gen-train``).

Composes ``conf/config.yaml``, instantiates the task's DataModule, the model and the
algorithm's LightningModule, fits, tests, and writes ``metrics.json`` and plots into the
run's Hydra directory. The test-and-report part
(:func:`reptile_gen.cli.test_and_report`) is shared with ``python -m reptile_gen.eval``.
A text run keeps a copy of its untrained model, so that its report shows samples from both;
a run whose config has a ``baseline`` node then trains that baseline for the same
wall-clock and prints the comparison (:mod:`reptile_gen.baseline`).
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from reptile_gen import CONF_DIR
from reptile_gen.cli import test_and_report
from reptile_gen.utils.callbacks import fit_record
from reptile_gen.utils.config_compat import exit_on_bad_overrides
from reptile_gen.utils.instantiate import build_run, build_trainer
from reptile_gen.utils.runtime import (
    check_checkpoint_matches,
    check_config,
    check_resumable,
    finish_loggers,
    load_checkpoint,
    optimized_value,
    resolve_ckpt_path,
    restore_hydra_files_on_error,
)
from reptile_gen.utils.user_errors import check_run_values, record_divergence, report_errors

__all__ = ["train", "test_and_report", "main"]

log = logging.getLogger(__name__)


def setup_run(cfg: DictConfig, out_dir: Path):
    """``(checkpoint to start from or None, datamodule, module)``, with the checkpoint
    checked against the module before anything is trained or written.

    ``ckpt_path`` is a file, ``last`` (this run dir's ``checkpoints/last.ckpt``) or null,
    where a run dir that already holds a last checkpoint resumes from it unless
    ``auto_resume=false`` (see :func:`~reptile_gen.utils.runtime.resolve_ckpt_path`). A
    corrupt, truncated or mismatched checkpoint is a clear error naming the file; the
    caller's run dir is left as it was.
    """
    fitting = bool(cfg.get("train", True))
    ckpt_path = resolve_ckpt_path(
        cfg.get("ckpt_path"), out_dir, auto_resume=fitting and bool(cfg.get("auto_resume", True))
    )
    datamodule, module = build_run(cfg)
    if ckpt_path is not None:
        checkpoint = load_checkpoint(ckpt_path)
        source = "this command's config"
        if fitting:
            check_resumable(checkpoint, module, ckpt_path, source)
            log.info(
                "resuming from %s (meta-step %s)", ckpt_path, checkpoint.get("global_step", "?")
            )
        else:
            check_checkpoint_matches(checkpoint, module, ckpt_path, source, built_by=source)
        del checkpoint
    return ckpt_path, datamodule, module


def train(cfg: DictConfig) -> dict:
    """Fit and test one run described by ``cfg``; returns its test metrics."""
    out_dir = Path(cfg.paths.output_dir)
    with restore_hydra_files_on_error(out_dir):
        check_run_values(cfg)
        check_config(cfg)
        ckpt_path, datamodule, module = setup_run(cfg, out_dir)
        trainer, loggers = build_trainer(cfg)
    # the untrained model, for the text report's samples before/after training
    untrained = None
    if cfg.get("train", True) and getattr(datamodule.spec, "kind", None) == "text":
        untrained = copy.deepcopy(module)
    try:
        started = time.perf_counter()
        if cfg.get("train", True):
            # weights_only=False: a run's checkpoint holds its config objects (a .ckpt is
            # a pickle: resume only trusted ones), which torch's default loader refuses
            try:
                trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=False)
            except Exception as err:  # a divergence leaves metrics.json saying so
                record_divergence(err, out_dir / "metrics.json")
                raise
        fit_seconds = time.perf_counter() - started
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if cfg.get("test", True):
            best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
            if not cfg.get("train", True):
                best = ckpt_path
            elif not cfg.get("test_best", True):
                best = None
            metrics |= test_and_report(
                trainer,
                module,
                datamodule,
                out_dir,
                ckpt_path=best,
                extra=fit_record(trainer, fit_seconds),
                untrained=untrained,
                # with a baseline, the comparison at the end prints it all
                summary=not cfg.get("baseline"),
            )
            if cfg.get("baseline") and trainer.is_global_zero:
                metrics |= compare_with_baseline(cfg, metrics, out_dir)
        return metrics
    finally:
        finish_loggers(loggers)


def compare_with_baseline(cfg: DictConfig, metrics: dict, out_dir: Path) -> dict:
    """Train ``cfg.baseline`` for the same wall-clock, record and print the comparison."""
    from reptile_gen.baseline import print_comparison, record_baseline, run_baseline

    baseline = run_baseline(cfg, metrics, train)
    added = record_baseline(out_dir, baseline, str(cfg.baseline.experiment))
    print_comparison(cfg, metrics, baseline, out_dir)
    return added


@exit_on_bad_overrides("config")
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
@report_errors
def main(cfg: DictConfig) -> float | None:
    return optimized_value(cfg, train(cfg))


if __name__ == "__main__":
    main()
