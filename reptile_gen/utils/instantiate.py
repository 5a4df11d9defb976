"""Build a run's objects from its composed config (shared by train, eval and sample)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from reptile_gen.utils.json_io import write_json
from reptile_gen.utils.slurm import cluster_plugins
from reptile_gen.utils.wandb_logging import instantiate_wandb_logger, is_wandb

__all__ = ["build_run", "build_callbacks", "build_loggers", "build_trainer", "write_metrics"]

log = logging.getLogger(__name__)


def build_run(cfg: DictConfig):
    """Seed, then instantiate ``(datamodule, module)`` from ``cfg`` in a fixed order (the
    order matters: it makes the model's random initialisation a function of the seed)."""
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.task)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    head_bias = model_cfg.pop("head_bias", "default")
    model = hydra.utils.instantiate(model_cfg)(spec=datamodule.spec)
    init_head_bias(model, head_bias, datamodule)
    # called, not instantiated with kwargs: Hydra would turn the spec dataclass into a config
    algorithm = hydra.utils.get_class(cfg.algorithm._target_)
    engine = {"engine": cfg.get("engine")} if getattr(algorithm, "has_inner_loop", True) else {}
    module = hydra.utils.instantiate(cfg.algorithm, _partial_=True)(
        model=model, task_spec=datamodule.spec, **engine
    )
    if str(cfg.trainer.get("precision", "")).startswith("64"):
        module = module.double()
    return datamodule, module


HEAD_BIAS = ("default", "prior")


def init_head_bias(model, head_bias: str, datamodule) -> None:
    """``model.head_bias``: ``default`` keeps PyTorch's initialisation of the output layer's
    bias; ``prior`` sets it to the task's training-target prior (``datamodule.output_prior()``:
    byte log-frequencies for text, the log-odds of an on pixel for images), so the untrained
    network already predicts the marginal distribution and meta-training starts from the
    unigram level instead of spending its first steps learning it."""
    if head_bias not in HEAD_BIAS:
        raise ValueError(f"model.head_bias={head_bias!r}; allowed: {', '.join(HEAD_BIAS)}")
    if head_bias == "default":
        return
    prior = getattr(datamodule, "output_prior", None)
    head = getattr(model, "head", None)
    if prior is None or getattr(head, "bias", None) is None:
        raise ValueError(
            f"model.head_bias=prior with task {type(datamodule).__name__}: it has no "
            "training-target prior (allowed with task=text, mnist, digits; use "
            "model.head_bias=default)"
        )
    with torch.no_grad():
        head.bias.copy_(prior().to(head.bias.dtype))


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """The configured callbacks; progress bars are left out when
    ``trainer.enable_progress_bar=false`` and the LR monitor without a logger (Lightning
    refuses both combinations)."""
    show_bar = cfg.trainer.get("enable_progress_bar", True)
    has_logger = any(c is not None and "_target_" in c for c in (cfg.get("logger") or {}).values())

    def wanted(target: str) -> bool:
        if target.endswith("ProgressBar"):
            return show_bar
        if target.endswith("LearningRateMonitor"):
            return has_logger
        return True

    return [
        hydra.utils.instantiate(c)
        for c in (cfg.get("callbacks") or {}).values()
        if c is not None and "_target_" in c and wanted(str(c["_target_"]))
    ]


def build_loggers(cfg: DictConfig) -> list:
    """The configured loggers; a W&B logger also gets its mode, the run's resolved config
    and, in a multirun, its job's name and sweep group (see :mod:`reptile_gen.utils.wandb_logging`)."""
    return [
        instantiate_wandb_logger(c, cfg) if is_wandb(c) else hydra.utils.instantiate(c)
        for c in (cfg.get("logger") or {}).values()
        if c is not None and "_target_" in c
    ]


def build_trainer(cfg: DictConfig, checkpointing: bool = True) -> tuple[pl.Trainer, list]:
    """``(trainer, loggers)`` from ``cfg.trainer`` with the configured callbacks and loggers;
    ``checkpointing=False`` leaves the checkpoint callback out (evaluation writes none)."""
    callbacks = build_callbacks(cfg)
    if not checkpointing:
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.Checkpoint)]
    loggers = build_loggers(cfg)
    kwargs = {"enable_checkpointing": False} if not checkpointing else {}
    if "plugins" not in cfg.trainer:
        # under Slurm: Lightning's auto-requeue off, submitit requeues (utils/slurm.py)
        kwargs["plugins"] = cluster_plugins() or None
    trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, **kwargs
    )
    return trainer, loggers


def write_metrics(metrics: dict, path: str | Path, extra: dict | None = None) -> dict:
    """Write one flat JSON object of the ``test/`` metrics (plus ``extra``) to ``path``;
    returns it. Only rank zero writes: under DDP with ``start_method: popen``
    (``trainer=ddp``) every rank runs the whole script, and their metrics are the same
    (gathered) ones."""
    flat = {}
    for key, value in metrics.items():
        if not key.startswith("test/"):
            continue
        value = value.item() if torch.is_tensor(value) else float(value)
        flat[key] = None if math.isnan(value) else value
    flat.update(extra or {})
    if rank_zero_only.rank != 0:
        return flat
    path = write_json(path, dict(sorted(flat.items())))
    log.info("wrote %s", path)
    return flat


def config_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
