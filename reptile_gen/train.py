"""Train a meta-learner: ``python -m reptile_gen.train [overrides]`` (``reptile-gen-train``).

Composes ``conf/config.yaml``, instantiates the task's DataModule, the model and the
algorithm's LightningModule, fits, tests, and writes ``metrics.json`` and plots into the
run's Hydra directory. The test-and-report part (:func:`test_and_report`) is shared with
``python -m reptile_gen.eval``.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig

from reptile_gen import CONF_DIR
from reptile_gen.utils.callbacks import fit_record
from reptile_gen.utils.instantiate import build_run, build_trainer, write_metrics
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
from reptile_gen.utils.wandb_logging import log_report

__all__ = ["train", "test_and_report", "main"]

log = logging.getLogger(__name__)


def test_and_report(
    trainer: pl.Trainer,
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    out_dir: str | Path,
    ckpt_path: str | None = None,
    extra: dict | None = None,
) -> dict:
    """Test ``module`` (with the weights of ``ckpt_path`` when given) on the task's fixed
    test tasks, write ``out_dir/metrics.json`` (the ``test/`` metrics plus ``extra``) and
    the task's plots (``datamodule.write_report``); returns the metrics written."""
    out_dir = Path(out_dir)
    # verbose=False: no table of every test metric (they are in metrics.json)
    trainer.test(
        module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=False, verbose=False
    )
    extra = (
        {**datamodule.metrics_extra(), **(extra or {})}
        if hasattr(datamodule, "metrics_extra")
        else extra
    )
    metrics = write_metrics(trainer.callback_metrics, out_dir / "metrics.json", extra=extra)
    written = []
    if trainer.is_global_zero and hasattr(datamodule, "write_report"):
        written = list(datamodule.write_report(module, out_dir))
        for path in written:
            log.info("wrote %s", path)
    if trainer.is_global_zero:
        # plots and samples as W&B media, metrics.json as the W&B summary (W&B loggers only)
        log_report(trainer.loggers, written, metrics, step=trainer.global_step, out_dir=out_dir)
        print_summary(metrics, out_dir)
    return metrics


def print_summary(metrics: dict, out_dir: Path) -> None:
    """The run's headline test metrics (bits per char or pixel; MSE after 1 and N steps)
    and, for text, its samples, on stdout."""
    keys = [
        k
        for k in (
            "test/nll_bits_per_char",
            "test/unigram/nll_bits_per_char",
            "test/nll_bits_per_pixel",
        )
        if k in metrics
    ]
    steps = sorted(
        int(m.group(1)) for k in metrics if (m := re.fullmatch(r"test/mse_step_(\d+)", k))
    )
    keys += [f"test/mse_step_{k}" for k in dict.fromkeys(steps[1:2] + steps[-1:])]
    for key in keys:
        if isinstance(metrics[key], float):
            print(f"{key} = {metrics[key]:.4f}")
    samples = out_dir / "samples.txt"
    if samples.is_file():
        print(f"samples ({samples}):")
        print(samples.read_text().rstrip())
    print(f"run dir: {out_dir}")


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
            )
        return metrics
    finally:
        finish_loggers(loggers)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
@report_errors
def main(cfg: DictConfig) -> float | None:
    return optimized_value(cfg, train(cfg))


if __name__ == "__main__":
    main()
