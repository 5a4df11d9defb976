"""Weights & Biases around a run (``logger=wandb``).

* :func:`resolve_mode`: ``logger.wandb.mode=auto`` (the default) is offline unless a
  W&B API key is found, and follows ``WANDB_MODE`` when that is set, so a laptop or a CI
  job without an account never blocks on a login prompt and never uploads by surprise.
* :func:`wandb_init_kwargs`: what the Hydra node of the logger cannot know by itself: the
  mode, the resolved Hydra config (logged as the run's config at ``wandb.init``), and in
  a multirun one W&B run per job, named by the job's overrides and grouped by the sweep.
* :func:`log_report`: the files a run's test writes (plots as ``wandb.Image``, text
  samples as a ``wandb.Table``) and its test metrics as the run summary.

``wandb`` itself is imported only when a W&B logger is used.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from reptile_gen.utils.runtime import ConfigError

__all__ = [
    "is_wandb",
    "resolve_mode",
    "has_api_key",
    "wandb_init_kwargs",
    "instantiate_wandb_logger",
    "log_report",
    "log_last_checkpoint",
]

log = logging.getLogger(__name__)

#: the modes wandb.init takes, and the legacy WANDB_MODE spellings it still accepts
MODES = ("online", "offline", "disabled")
ALIASES = {"run": "online", "dryrun": "offline"}
DEFAULT_BASE_URL = "https://api.wandb.ai"


def is_wandb(node) -> bool:
    """Whether a logger config node builds Lightning's ``WandbLogger``."""
    return str((node or {}).get("_target_", "")).endswith("WandbLogger")


def has_api_key(environ=None) -> bool:
    """Whether W&B credentials are available without a prompt: ``WANDB_API_KEY`` or
    ``WANDB_IDENTITY_TOKEN_FILE`` in the environment, or an entry for the W&B host
    (``WANDB_BASE_URL``, default api.wandb.ai) in the ``.netrc`` that ``wandb login``
    writes."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY") or environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:  # wandb's own .netrc reader (honours NETRC); a private module, so guarded
        from wandb.sdk.lib.wbauth import read_netrc_auth

        return bool(read_netrc_auth(host=environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL))
    except Exception as err:
        log.debug("no W&B credentials read from .netrc: %s", err)
        return False


def resolve_mode(mode: str | None = "auto", environ=None) -> str:
    """The ``wandb.init`` mode for ``logger.wandb.mode``.

    ``online``, ``offline`` and ``disabled`` are taken as they are. ``auto`` (or null) is
    ``WANDB_MODE`` when that is set (``online`` with a key streams, ``disabled`` turns
    W&B off), else ``online`` when :func:`has_api_key`, else ``offline`` (sync later with
    ``wandb sync``).
    """
    environ = os.environ if environ is None else environ
    value = "auto" if mode is None else str(mode).strip().lower()
    value = ALIASES.get(value, value)
    if value in MODES:
        return value
    if value != "auto":
        raise ConfigError(
            f"logger.wandb.mode={mode!r}: allowed: auto (WANDB_MODE if set, else online with "
            "an API key, else offline), online, offline, disabled"
        )
    env_mode = environ.get("WANDB_MODE", "").strip().lower()
    if env_mode:
        env_mode = ALIASES.get(env_mode, env_mode)
        if env_mode not in MODES:
            raise ConfigError(
                f"WANDB_MODE={environ['WANDB_MODE']!r} (with logger.wandb.mode=auto): allowed: "
                "online, offline, disabled (or unset it)"
            )
        return env_mode
    return "online" if has_api_key(environ) else "offline"


def _hydra_job():
    """``(is multirun, hydra config)`` of the running Hydra app, or ``(False, None)``."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return False, None
        hydra_cfg = HydraConfig.get()
        return hydra_cfg.mode == RunMode.MULTIRUN, hydra_cfg
    except Exception:
        return False, None


def sweep_group(hydra_cfg, log_dir: str | None) -> str:
    """A multirun's W&B group: its sweep dir relative to the runs' root when below it
    (``sine_maml/multiruns/2024-05-01_12-00-00``), else the sweep dir's name."""
    sweep_dir = Path(str(hydra_cfg.sweep.dir)).resolve()
    if log_dir:
        try:
            return sweep_dir.relative_to(Path(log_dir).resolve()).as_posix()
        except ValueError:
            pass
    return sweep_dir.name


def run_config(cfg: DictConfig) -> dict:
    """The resolved config of the run (without the ``hydra`` node that a config composed
    with ``return_hydra_config`` carries), as W&B's run config."""
    run_keys = [key for key in cfg if key != "hydra"]
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, run_keys), resolve=True)


def wandb_init_kwargs(node: DictConfig, cfg: DictConfig) -> dict:
    """Keyword arguments for instantiating the W&B logger ``node`` of the run ``cfg``.

    ``mode`` (see :func:`resolve_mode`; Lightning's own ``offline`` flag is turned into
    ``mode=offline`` and passed as false, because Lightning refuses ``log_model`` with it
    although offline runs keep artifacts for ``wandb sync``), ``config`` (the resolved run
    config), and in a multirun, when not set: ``group`` (:func:`sweep_group`) and ``name``
    (the job's ``override_dirname``, e.g. ``algorithm=maml,seed=1``), so that every job is
    its own run and the sweep's runs are one group.
    """
    mode = "offline" if node.get("offline") else resolve_mode(node.get("mode", "auto"))
    kwargs = {"mode": mode, "offline": False, "config": run_config(cfg)}
    multirun, hydra_cfg = _hydra_job()
    if multirun:
        if not node.get("group"):
            kwargs["group"] = sweep_group(hydra_cfg, cfg.get("paths", {}).get("log_dir"))
        if not node.get("name"):
            kwargs["name"] = hydra_cfg.job.override_dirname or f"job{hydra_cfg.job.num}"
    return kwargs


def instantiate_wandb_logger(node: DictConfig, cfg: DictConfig):
    """Lightning's ``WandbLogger`` from ``node`` with :func:`wandb_init_kwargs`; the run
    config is passed on to ``wandb.init`` (the W&B run itself is created lazily, when
    Lightning first logs)."""
    import hydra

    kwargs = wandb_init_kwargs(node, cfg)
    config = kwargs.pop("config")
    # ``config`` is also the name of instantiate()'s own first argument: bind it afterwards
    return hydra.utils.instantiate(node, _partial_=True, **kwargs)(config=config)


def _numbers(metrics: dict) -> dict:
    return {
        k: v
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def log_last_checkpoint(logger, out_dir, step: int | None = None) -> None:
    """With ``log_model``, Lightning uploads what a ``ModelCheckpoint`` writes (the best on
    ``val/loss``); the latest training state, ``checkpoints/last.ckpt`` (written by
    :class:`~reptile_gen.utils.callbacks.LastCheckpoint`, which is not one), is added to
    the same ``model-<run id>`` artifact with the alias ``last``, to resume from."""
    path = Path(out_dir) / "checkpoints" / "last.ckpt"
    if not getattr(logger, "_log_model", False) or not path.is_file():
        return
    import wandb

    run = logger.experiment
    artifact = wandb.Artifact(
        name=f"model-{run.id}",
        type="model",
        metadata={"original_filename": path.name, "global_step": step},
    )
    artifact.add_file(str(path), name="model.ckpt")
    run.log_artifact(artifact, aliases=["last"])


def log_report(loggers, paths, metrics: dict, step: int | None = None, out_dir=None) -> None:
    """Log a run's report to every W&B logger in ``loggers``: each PNG in ``paths`` as a
    ``wandb.Image`` under ``report/<file stem>`` (learning_curve, fit, samples...), each
    ``samples.txt`` as a ``wandb.Table`` ``report/samples`` (one row per line), the
    numeric ``metrics`` (what metrics.json holds) as the run summary, and with
    ``log_model`` the run dir's ``last.ckpt`` (:func:`log_last_checkpoint`). The files are
    on disk already, so a W&B failure here is a warning, not a failed run."""
    for logger in loggers or []:
        if type(logger).__name__ != "WandbLogger":
            continue
        try:
            for path in map(Path, paths or []):
                if path.suffix.lower() == ".png" and path.is_file():
                    logger.log_image(key=f"report/{path.stem}", images=[str(path)], step=step)
                elif path.name == "samples.txt" and path.is_file():
                    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
                    logger.log_table(
                        key="report/samples",
                        columns=["index", "sample"],
                        data=[[i, line] for i, line in enumerate(lines)],
                        step=step,
                    )
            logger.experiment.summary.update(_numbers(metrics))
            if out_dir is not None:
                log_last_checkpoint(logger, out_dir, step)
        except Exception as err:
            log.warning("could not log the report to W&B: %s", err, exc_info=True)
