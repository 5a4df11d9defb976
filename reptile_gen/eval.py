"""Re-evaluate a checkpoint: ``python -m reptile_gen.eval ckpt_path=<file> [overrides]``
(console script ``reptile-gen-eval``).

The run that wrote the checkpoint saved its config in ``<run dir>/.hydra/config.yaml`` (the
run dir is the parent of the checkpoint's ``checkpoints/`` folder). That config is loaded,
the command-line overrides are applied on top of it (``key=value`` as well as
``group=option``, e.g. ``trainer=cpu``: Hydra composes them after the run's own overrides
and every node an override touches is taken from that composition, see
:func:`reptile_gen.cli.apply_overrides`),
the datamodule and module are rebuilt, the checkpoint's weights are tested on the task's
fixed test tasks, and ``metrics.json``, the plots and ``.hydra/`` are written into a new run
dir, ``outputs/eval/runs/<date>_<time>/``.

In the new run dir ``.hydra/config.yaml`` is the config that was evaluated (the saved one
with the overrides), and ``.hydra/eval_source.yaml`` records the checkpoint, its run dir and
that run's own overrides and group choices (``reptile-gen-compare`` labels eval runs with
them).

Only load checkpoints you trust: a ``.ckpt`` is a pickle.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from reptile_gen import CONF_DIR
from reptile_gen.cli import (
    apply_overrides,
    build_eval_config,
    find_run_config,
    hydra_subdir,
    source_record,
    test_and_report,
    with_run_groups,
)
from reptile_gen.utils.config_compat import exit_on_moved_overrides
from reptile_gen.utils.runtime import (
    CheckpointError,
    check_checkpoint_matches,
    check_config,
    finish_loggers,
    load_checkpoint,
    optimized_value,
)

# light imports only at module level: torch and Lightning are imported once the inputs
# are checked, so a wrong command line fails fast
from reptile_gen.utils.user_errors import report_errors

__all__ = [
    "CheckpointError",
    "apply_overrides",
    "build_eval_config",
    "check_checkpoint_matches",
    "evaluate",
    "find_run_config",
    "load_checkpoint",
    "main",
]

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Test the checkpoint ``cfg.ckpt_path`` with its run's config plus ``overrides``
    (default: the command line's); returns the metrics written to ``metrics.json``."""
    eff, ckpt_path, run_cfg_path, checkpoint, overrides = build_eval_config(cfg, overrides)
    check_config(eff)
    from reptile_gen.utils.instantiate import build_run, build_trainer

    out_dir = Path(eff.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    datamodule, module = build_run(eff)
    check_checkpoint_matches(checkpoint, module, ckpt_path, run_cfg_path)
    del checkpoint
    hydra_dir = hydra_subdir(out_dir)
    if hydra_dir is not None:
        # the config that was evaluated, rather than the eval app's own defaults
        (hydra_dir / "config.yaml").write_text(OmegaConf.to_yaml(eff))
        source = source_record(ckpt_path, run_cfg_path, overrides)
        (hydra_dir / "eval_source.yaml").write_text(OmegaConf.to_yaml(source))
    log.info("evaluating %s with %s (+ %s) into %s", ckpt_path, run_cfg_path, overrides, out_dir)
    trainer, loggers = build_trainer(eff, checkpointing=False)
    try:
        with warnings.catch_warnings():
            # the checkpoint callback is left out on purpose: an evaluation writes no checkpoints
            warnings.filterwarnings("ignore", message=".*callbacks used to create the checkpoint")
            return test_and_report(
                trainer,
                module,
                datamodule,
                out_dir,
                ckpt_path=ckpt_path,
                extra={"ckpt_path": str(Path(ckpt_path).resolve())},
            )
    finally:
        finish_loggers(loggers)


@with_run_groups
@exit_on_moved_overrides
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
@report_errors
def main(cfg: DictConfig) -> float | None:
    return optimized_value(cfg, evaluate(cfg))


if __name__ == "__main__":
    main()
