"""Data-parallel training (DDP) of the meta-learners: the strategy and a launch check.

Each rank runs the inner loops of its own ``task.meta_batch_size`` tasks (the meta-batch
is per rank, as a DDP batch size is per device); the meta-gradient is the gradient of
the rank's meta-loss, and DDP's all-reduce averages it, which equals the meta-gradient of
one process over all ranks' tasks because every algorithm's meta-loss is a mean over
tasks (Reptile's through its surrogate, see :class:`~reptile_gen.algorithms.Reptile`).

:class:`DDPStrategy` is Lightning's strategy with one addition for the spawning start
methods (``ddp_spawn``, used by ``trainer=ddp_cpu``): the held-out results that the
plots are drawn from (``module.eval_curves``) come back to the main process with the
weights and metrics, so ``learning_curve.png`` is written there as in a single-process
run. With ``start_method: popen`` (``trainer=ddp``) every rank runs the whole script and
rank zero already holds them.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.strategies import DDPStrategy as _LightningDDPStrategy
from pytorch_lightning.strategies.launchers.multiprocessing import _MultiProcessingLauncher

from reptile_gen.utils.errors import ConfigError

__all__ = ["DDPStrategy", "check_ddp_launch"]


class _EvalCurvesLauncher(_MultiProcessingLauncher):
    """Lightning's process-spawning launcher; it also sends rank zero's
    ``eval_curves`` (the gathered per-task validation/test results) back to the main
    process, where the run's plots are drawn."""

    def get_extra_results(self, trainer: pl.Trainer) -> dict[str, Any]:
        # through a file, not the results queue: Lightning joins the ranks before it reads
        # the queue, so a payload larger than the pipe's buffer would block rank zero's
        # put forever (the curves of a run that validated several times are that large)
        extra = super().get_extra_results(trainer)
        curves = getattr(trainer.lightning_module, "eval_curves", None)
        if curves:
            fd, path = tempfile.mkstemp(prefix="reptile_gen_eval_curves_", suffix=".pt")
            with os.fdopen(fd, "wb") as f:
                torch.save({k: v.detach().cpu() for k, v in curves.items()}, f)
            extra["eval_curves_path"] = path
        return extra

    def update_main_process_results(self, trainer: pl.Trainer, extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        path = extra.get("eval_curves_path")
        if path:
            try:
                curves = torch.load(path, weights_only=True)
            finally:
                os.remove(path)
            module = trainer.lightning_module
            module.eval_curves = {**getattr(module, "eval_curves", {}), **curves}


class DDPStrategy(_LightningDDPStrategy):
    """``pytorch_lightning.strategies.DDPStrategy`` (same arguments; extra keyword
    arguments go to ``torch.nn.parallel.DistributedDataParallel``) whose spawning
    launcher brings the evaluation curves back to the main process."""

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if self._start_method != "popen":
            self._launcher = _EvalCurvesLauncher(self, start_method=self._start_method)


def _relaunches_command_line(strategy) -> bool:
    """Whether a Lightning strategy starts its extra ranks by re-running the command
    line (DDP's ``popen`` start method: ``ddp``, ``ddp_find_unused_parameters_*``)."""
    if isinstance(strategy, str):
        name = strategy.lower()
        return name.startswith("ddp") and not any(
            word in name for word in ("spawn", "fork", "notebook")
        )
    if isinstance(strategy, DictConfig) and str(strategy.get("_target_", "")).endswith(
        "DDPStrategy"
    ):
        return strategy.get("start_method", "popen") == "popen"
    return False


def check_ddp_launch(cfg: DictConfig) -> None:
    """DDP that re-runs the command line for its extra ranks (``trainer=ddp``'s
    ``start_method: popen``) inside a local Hydra sweep (``-m`` with the basic launcher)
    would re-run the whole sweep in every rank: a clear error instead. Under a launcher
    that starts one process per rank itself (SLURM through submitit), Lightning starts
    no processes and ``popen`` is right."""
    trainer = cfg.get("trainer") or {}
    strategy = trainer.get("strategy")
    one_process = str(trainer.get("devices", 1)) == "1" and trainer.get("num_nodes", 1) == 1
    if one_process or not _relaunches_command_line(strategy):
        return
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    launcher = str((hydra_cfg.get("launcher") or {}).get("_target_", ""))
    if hydra_cfg.mode == RunMode.MULTIRUN and launcher.endswith("BasicLauncher"):
        shown = strategy if isinstance(strategy, str) else "DDPStrategy(start_method=popen)"
        raise ConfigError(
            f"trainer.strategy={shown} in a multirun (-m) with the basic launcher: DDP "
            "would start its extra ranks by re-running this command line, i.e. the whole "
            "sweep, once per rank; allowed in a sweep: trainer.strategy.start_method=spawn "
            "(or trainer=ddp_cpu), or a launcher that starts the ranks itself "
            "(hydra/launcher=submitit_slurm)"
        )
