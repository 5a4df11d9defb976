"""Re-evaluate a checkpoint: ``python -m reptile_gen.eval ckpt_path=<file> [overrides]``
(console script ``reptile-gen-eval``).

The run that wrote the checkpoint saved its config in ``<run dir>/.hydra/config.yaml`` (the
run dir is the parent of the checkpoint's ``checkpoints/`` folder). That config is loaded,
the command-line overrides are applied on top of it (``key=value`` as well as
``group=option``, e.g. ``trainer=cpu``: the eval app composes the same overrides with Hydra
and every node an override touches is copied from that composition into the saved config),
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
from contextlib import nullcontext
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from reptile_gen import CONF_DIR
from reptile_gen.utils.runtime import (
    CheckpointError,
    ConfigError,
    check_checkpoint_matches,
    check_config,
    finish_loggers,
    load_checkpoint,
    optimized_value,
    resolve_ckpt_path,
)

# light imports only at module level: torch and Lightning are imported once the inputs
# are checked, so a wrong command line fails fast
from reptile_gen.utils.user_errors import report_errors

__all__ = [
    "CheckpointError",
    "apply_overrides",
    "check_checkpoint_matches",
    "evaluate",
    "find_run_config",
    "load_checkpoint",
    "main",
]

log = logging.getLogger(__name__)

USAGE = "python -m reptile_gen.eval ckpt_path=<run dir>/checkpoints/last.ckpt [overrides]"


# ---------------------------------------------------------------------- locating inputs
def find_run_config(ckpt_path: str | Path, run_config: str | Path | None = None) -> Path:
    """The config of the run that wrote ``ckpt_path``: ``run_config`` when given, else
    ``<run dir>/.hydra/config.yaml`` with ``<run dir>`` the parent of ``checkpoints/``."""
    if run_config not in (None, ""):
        path = Path(str(run_config)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"run_config={str(run_config)!r}: no such file (give the config.yaml saved "
                "by the run that wrote the checkpoint, <run dir>/.hydra/config.yaml)"
            )
        return path
    ckpt = Path(ckpt_path).expanduser().resolve()
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={str(ckpt_path)!r}: its run dir {str(run_dir)!r} has no saved config "
            f"(.hydra/config.yaml, written by `python -m reptile_gen.train`); pass the config "
            "of the run that wrote the checkpoint with run_config=<path to its config.yaml>"
        )
    return path


# ---------------------------------------------------------------------- overrides
def _defaults_list(config_name: str, overrides: list[str]):
    """Hydra's defaults list for ``overrides`` (which files are loaded, into which package)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    ctx = (
        nullcontext()
        if GlobalHydra.instance().is_initialized()
        else initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3")
    )
    with ctx:
        loader = GlobalHydra.instance().config_loader()
        return loader, loader.compute_defaults_list(config_name, overrides, RunMode.RUN)


def _leaf_paths(node, prefix: str = "") -> list[str]:
    if isinstance(node, dict) and node:
        out = []
        for key, value in node.items():
            out += _leaf_paths(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    return [prefix] if prefix else []


def _group_touched(group: str, option: str, loader, defaults) -> list[str]:
    """The config nodes a ``group=option`` override sets: the group's package, or for a
    ``@package _global_`` option (experiment, debug) every key its files set and the
    packages of the groups it overrides."""
    results = [d for d in defaults.defaults if d.config_path]
    chosen = {f"{group}/{option}"}
    # the option's own nested defaults, and the groups its defaults list overrides
    grew = True
    while grew:
        grew = False
        overridden = {
            g
            for g, meta in defaults.overrides.override_metadata.items()
            if meta.containing_config_path in chosen
        }
        for d in results:
            in_group = any(d.config_path.startswith(f"{g}/") for g in overridden)
            if d.config_path not in chosen and (d.parent in chosen or in_group):
                chosen.add(d.config_path)
                grew = True
    paths: list[str] = []
    for d in results:
        if d.config_path not in chosen or d.package.startswith("hydra"):
            continue
        if d.package:
            paths.append(d.package)
            continue
        loaded = loader.repository.load_config(d.config_path)
        content = OmegaConf.to_container(loaded.config, resolve=False) if loaded else {}
        content = {k: v for k, v in content.items() if k not in ("defaults", "hydra")}
        paths += _leaf_paths(content)
    return list(dict.fromkeys(paths))


def touched_paths(overrides: list[str], config_name: str = "eval") -> list[tuple[str, str]]:
    """``[(action, dotted path)]`` for command-line ``overrides``: ``copy`` a node from the
    eval composition into the saved config, or ``delete`` it (``~key``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    loader = defaults = None
    actions: list[tuple[str, str]] = []
    for override in parsed:
        key = override.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue
        if defaults is None:
            loader, defaults = _defaults_list(config_name, list(overrides))
        if key in defaults.overrides.known_choices:  # a config group
            package = override.package or key.replace("/", ".")
            if override.is_delete():
                actions.append(("delete", package))
            else:
                value = override.value()
                for path in _group_touched(key, str(value), loader, defaults):
                    actions.append(("copy", path))
        elif override.is_delete():
            actions.append(("delete", key))
        else:
            actions.append(("copy", key))
    return actions


def _raw_get(container, path: str):
    node = container
    for part in path.split("."):
        if isinstance(node, list):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise KeyError(path)
    return node


def apply_overrides(
    run_cfg: DictConfig, composed: DictConfig, overrides: list[str], config_name: str = "eval"
) -> DictConfig:
    """A copy of ``run_cfg`` with every node that ``overrides`` touch taken from
    ``composed`` (the eval app's composition of the same overrides)."""
    out = OmegaConf.create(OmegaConf.to_container(run_cfg, resolve=False))
    raw = OmegaConf.to_container(composed, resolve=False)
    for action, path in touched_paths(overrides, config_name):
        if action == "delete":
            parent, _, last = path.rpartition(".")
            node = OmegaConf.select(out, parent) if parent else out
            if isinstance(node, DictConfig) and last in node:
                with open_dict(node):
                    del node[last]
            continue
        try:
            value = _raw_get(raw, path)
        except (KeyError, IndexError, ValueError):
            continue  # e.g. a key only the eval app has
        OmegaConf.update(out, path, value, merge=False, force_add=True)
    return out


# ---------------------------------------------------------------------- evaluation
def _hydra_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def _hydra_subdir(out_dir: Path) -> Path | None:
    from hydra.core.hydra_config import HydraConfig

    subdir = ".hydra"
    if HydraConfig.initialized():
        subdir = HydraConfig.get().output_subdir
        if subdir is None:
            return None
    path = out_dir / subdir
    path.mkdir(parents=True, exist_ok=True)
    return path


def _read_yaml(path: Path):
    return OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else None


def _source_record(ckpt_path: str, run_cfg_path: Path, overrides: list[str]) -> dict:
    hydra_dir = run_cfg_path.resolve().parent
    hydra_yaml = _read_yaml(hydra_dir / "hydra.yaml") or {}
    choices = (hydra_yaml.get("hydra", {}).get("runtime", {}) or {}).get("choices")
    return {
        "ckpt_path": str(Path(ckpt_path).resolve()),
        "run_dir": str(hydra_dir.parent),
        "run_config": str(run_cfg_path.resolve()),
        "run_overrides": _read_yaml(hydra_dir / "overrides.yaml"),
        "run_choices": choices,
        "eval_overrides": list(overrides),
    }


def build_eval_config(cfg: DictConfig, overrides: list[str] | None = None):
    """``(effective config, ckpt path, run config path, checkpoint)`` for the eval app's
    composed ``cfg``: every input is checked before anything is built."""
    if OmegaConf.is_missing(cfg, "ckpt_path") or cfg.get("ckpt_path") in (None, ""):
        raise ConfigError(f"ckpt_path is required: {USAGE}")
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path)
    run_cfg_path = find_run_config(ckpt_path, cfg.get("run_config"))
    checkpoint = load_checkpoint(ckpt_path)
    overrides = _hydra_overrides() if overrides is None else list(overrides)
    try:
        run_cfg = OmegaConf.load(run_cfg_path)
    except Exception as err:
        raise ConfigError(f"run config {str(run_cfg_path)!r} cannot be read: {err}") from err
    if not isinstance(run_cfg, DictConfig) or "algorithm" not in run_cfg:
        raise ConfigError(
            f"run config {str(run_cfg_path)!r} is not a run's config (no algorithm node); "
            "give the .hydra/config.yaml saved by the training run"
        )
    config_name = "eval"
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized() and HydraConfig.get().job.config_name:
        config_name = HydraConfig.get().job.config_name
    eff = apply_overrides(run_cfg, cfg, overrides, config_name)
    with open_dict(eff):
        eff.task_name = cfg.get("task_name", "eval")
        eff.ckpt_path = ckpt_path
        eff.run_config = str(run_cfg_path)
        eff.train = False
        eff.test = True
        eff.paths.output_dir = str(cfg.paths.output_dir)
    return eff, ckpt_path, run_cfg_path, checkpoint, overrides


def evaluate(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Test the checkpoint ``cfg.ckpt_path`` with its run's config plus ``overrides``
    (default: the command line's); returns the metrics written to ``metrics.json``."""
    eff, ckpt_path, run_cfg_path, checkpoint, overrides = build_eval_config(cfg, overrides)
    check_config(eff)
    from reptile_gen.train import test_and_report
    from reptile_gen.utils.instantiate import build_run, build_trainer

    out_dir = Path(eff.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    datamodule, module = build_run(eff)
    check_checkpoint_matches(checkpoint, module, ckpt_path, run_cfg_path)
    del checkpoint
    hydra_dir = _hydra_subdir(out_dir)
    if hydra_dir is not None:
        # the config that was evaluated, rather than the eval app's own defaults
        (hydra_dir / "config.yaml").write_text(OmegaConf.to_yaml(eff))
        source = _source_record(ckpt_path, run_cfg_path, overrides)
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


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
@report_errors
def main(cfg: DictConfig) -> float | None:
    return optimized_value(cfg, evaluate(cfg))


if __name__ == "__main__":
    main()
