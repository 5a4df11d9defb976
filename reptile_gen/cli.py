"""What the entry points share (train, eval, sample, compare import none of each other).

* :func:`test_and_report`, :func:`print_summary`: test a module, write ``metrics.json``
  and the task's report (:mod:`reptile_gen.reports`), print the headline metrics;
* :func:`find_run_config`, :func:`load_run_config`: the config a run saved next to its
  checkpoints (``<run dir>/.hydra/config.yaml``); :func:`load_run_config` is the one place
  a saved config is read;
* :func:`apply_overrides`, :func:`build_eval_config`: a run's saved config with the
  command line's overrides on top, composed with Hydra's own compose API;
* :func:`hydra_subdir`, :func:`source_record`: what an eval or sample run records about
  its source.

Only load checkpoints you trust: a ``.ckpt`` is a pickle.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
from contextlib import nullcontext
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from reptile_gen import CONF_DIR
from reptile_gen.utils.config_compat import upgrade_config
from reptile_gen.utils.runtime import ConfigError, load_checkpoint, resolve_ckpt_path

__all__ = [
    "apply_overrides",
    "build_eval_config",
    "compose_run_config",
    "find_run_config",
    "hydra_overrides",
    "hydra_subdir",
    "load_run_config",
    "print_samples",
    "print_summary",
    "source_record",
    "test_and_report",
    "with_run_groups",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- test and report
def test_and_report(
    trainer, module, datamodule, out_dir, ckpt_path=None, extra=None, untrained=None, summary=True
) -> dict:
    """Test ``module`` (with the weights of ``ckpt_path`` when given) on the task's fixed
    test tasks, write ``out_dir/metrics.json`` (the ``test/`` metrics plus ``extra``) and
    the task's report (:func:`reptile_gen.reports.write_report`; ``untrained``: the module
    before training, for a report that shows both) and, with ``summary``, print the headline
    metrics; returns the metrics written."""
    from reptile_gen.reports import write_report
    from reptile_gen.utils.instantiate import write_metrics
    from reptile_gen.utils.wandb_logging import log_report

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
    if trainer.is_global_zero:
        written = write_report(module, datamodule, out_dir, untrained=untrained)
        for path in written:
            log.info("wrote %s", path)
        # plots and samples as W&B media, metrics.json as the W&B summary (W&B loggers only)
        log_report(trainer.loggers, written, metrics, step=trainer.global_step, out_dir=out_dir)
        if summary:
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
    print_samples(Path(out_dir))
    print(f"run dir: {out_dir}")


def _cell(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


def print_samples(out_dir: Path, width: int = 64) -> None:
    """The run's text samples on stdout: ``samples.txt``, next to ``samples_untrained.txt``
    (two columns of ``width``, longer lines cut with ``~``) when there is one, and the share
    of each that parse like the corpus's lines (``samples_check.json``)."""
    samples, before = out_dir / "samples.txt", out_dir / "samples_untrained.txt"
    if not samples.is_file():
        return
    after_lines = samples.read_text(encoding="utf-8").splitlines()
    if not before.is_file():
        print(f"samples ({samples}):")
        print("\n".join(after_lines))
        return
    before_lines = before.read_text(encoding="utf-8").splitlines()
    print(f"samples, untrained | trained ({before.name}, {samples.name} in the run dir):")
    print(f"{'untrained':<{width}} | trained")
    for left, right in zip(before_lines, after_lines):
        print(f"{_cell(left, width):<{width}} | {_cell(right, width)}")
    check = out_dir / "samples_check.json"
    if check.is_file():
        c = json.loads(check.read_text())
        n = c["num_samples"]
        shares = [c.get("untrained_share"), c["trained_share"]]
        counts = ["-" if s is None else f"{round(s * n)}/{n}" for s in shares]
        print(
            f"samples that parse as {c['corpus']} lines: untrained {counts[0]}, trained {counts[1]}"
        )


# ---------------------------------------------------------------------- a run's config
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


def load_run_config(path: str | Path) -> DictConfig:
    """A run's saved config (``<run dir>/.hydra/config.yaml``), checked to be one: the one
    place where eval and sample read a saved run config."""
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:
        raise ConfigError(f"run config {str(path)!r} cannot be read: {err}") from err
    if not isinstance(cfg, DictConfig) or "algorithm" not in cfg:
        raise ConfigError(
            f"run config {str(path)!r} is not a run's config (no algorithm node); "
            "give the .hydra/config.yaml saved by the training run"
        )
    return upgrade_config(cfg)


def _read_yaml(path: Path):
    return OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else None


def run_overrides(run_cfg_path: Path) -> list[str]:
    """The command-line overrides of the run whose config is ``run_cfg_path`` (its
    ``.hydra/overrides.yaml``; ``[]`` when there is none), without ``hydra`` ones."""
    saved = _read_yaml(Path(run_cfg_path).parent / "overrides.yaml")
    if not isinstance(saved, list):
        return []
    return [str(o) for o in saved if not _is_hydra_key(str(o).split("=", 1)[0].lstrip("~+"))]


# ---------------------------------------------------------------------- overrides
def _is_hydra_key(key: str) -> bool:
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    """Hydra's composition of ``config_name`` with ``overrides`` (without ``hydra``)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    ctx = (
        nullcontext()
        if GlobalHydra.instance().is_initialized()
        else initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3")
    )
    with ctx:
        cfg = compose(config_name, overrides=list(overrides))
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def compose_run_config(overrides: list[str]) -> DictConfig:
    """``conf/config.yaml`` composed with ``overrides``, as ``python -m reptile_gen.train``
    would (without the ``hydra`` node: set ``paths.output_dir`` before running it)."""
    return _compose("config", overrides)


def _is_global_group(group: str, option: str) -> bool:
    """Whether the option file ``conf/<group>/<option>.yaml`` is ``@package _global_``."""
    path = Path(CONF_DIR) / group / f"{option}.yaml"
    if not path.is_file():
        return False
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if re.match(r"#\s*@package\s+_global_\s*$", line):
            return True
    return False


def _groups_set_by(group: str, option: str) -> list[str]:
    """The packages of the config groups that the option file ``conf/<group>/<option>.yaml``
    chooses in its defaults list (``override /task: digits`` -> ``task``)."""
    path = Path(CONF_DIR) / group / f"{option}.yaml"
    defaults = OmegaConf.to_container(OmegaConf.load(path)).get("defaults") or []
    packages = []
    for entry in defaults:
        if not isinstance(entry, dict):
            continue
        for key in entry:
            name = str(key).removeprefix("override").strip().lstrip("/")
            if name and "@" not in name and (Path(CONF_DIR) / name).is_dir():
                packages.append(name.replace("/", "."))
    return packages


def _diff_paths(old, new, prefix: str = "") -> list[tuple[str, str]]:
    """``[(action, path)]`` turning ``old`` into ``new`` (raw containers): ``copy`` a
    node that differs (a whole mapping when its ``_target_`` changed), ``delete`` one
    that ``new`` lacks."""
    if (
        isinstance(old, dict)
        and isinstance(new, dict)
        and old.get("_target_") == new.get("_target_")
    ):
        out = []
        for key in new:
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                out.append(("copy", path))
            else:
                out += _diff_paths(old[key], new[key], path)
        out += [("delete", f"{prefix}.{k}" if prefix else str(k)) for k in old if k not in new]
        return out
    return [] if old == new else [("copy", prefix)]


def apply_overrides(
    run_cfg: DictConfig,
    overrides: list[str],
    config_name: str = "eval",
    base_overrides: list[str] | None = None,
) -> DictConfig:
    """A copy of the saved ``run_cfg`` with the command-line ``overrides`` on top.

    The overrides are composed by Hydra (``hydra.compose`` of ``config_name``, after the
    run's own ``base_overrides``), and the nodes they touch are taken from that
    composition: the value of a ``key=value``; the whole package of a ``group=option``;
    for a ``@package _global_`` option (``experiment=``, ``debug=``) the packages of the
    groups it chooses and every other node it changes, compared with the composition
    without it. ``~key`` deletes the key.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = [
        o
        for o in OverridesParser.create().parse_overrides(list(overrides))
        if not _is_hydra_key(o.key_or_group)
    ]
    out = OmegaConf.create(OmegaConf.to_container(run_cfg, resolve=False))
    if not parsed:
        return out
    base_overrides = list(base_overrides or [])
    mine = [o.input_line for o in parsed]
    try:
        composed = _compose(config_name, base_overrides + mine)
    except Exception:
        if not base_overrides:
            raise
        base_overrides = []  # the run's own overrides no longer compose: leave them out
        composed = _compose(config_name, mine)
    raw = OmegaConf.to_container(composed, resolve=False)
    actions: list[tuple[str, str]] = []
    global_groups = []
    for override in parsed:
        key = override.key_or_group
        is_group = (Path(CONF_DIR) / key).is_dir()
        if override.is_delete():
            actions.append(("delete", override.package or key.replace("/", ".")))
        elif is_group and _is_global_group(key, str(override.value())):
            global_groups.append(override)
            actions += [("copy", p) for p in _groups_set_by(key, str(override.value()))]
        elif is_group:
            actions.append(("copy", override.package or key.replace("/", ".")))
        else:
            actions.append(("copy", key))
    if global_groups:
        others = [o.input_line for o in parsed if o not in global_groups]
        without = OmegaConf.to_container(
            _compose(config_name, base_overrides + others), resolve=False
        )
        actions = _diff_paths(without, raw) + actions
    for action, path in actions:
        if action == "delete":
            parent, _, last = path.rpartition(".")
            node = OmegaConf.select(out, parent) if parent else out
            if isinstance(node, DictConfig) and last in node:
                with open_dict(node):
                    del node[last]
            continue
        value = OmegaConf.select(OmegaConf.create(raw), path, default=_MISSING)
        if value is _MISSING:
            continue  # e.g. a key only the eval app has
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=False)
        OmegaConf.update(out, path, value, merge=False, force_add=True)
    return out


_MISSING = object()


# ---------------------------------------------------------------------- eval/sample runs
#: the group choices :func:`with_run_groups` put on the command line (not the user's)
_RUN_GROUPS: list[str] = []


def run_group_choices(argv: list[str]) -> list[str]:
    """The group choices (``experiment=``, ``task=``, ...) of the run that wrote the
    checkpoint ``argv`` names, for the groups ``argv`` does not choose itself. Composing the
    eval/sample app with them makes that run's own keys valid overrides (``task.max_len``
    of a text run: the app's default task is sine). ``[]`` for a sweep (``-m``), several
    checkpoints, or a run whose files cannot be read (the app then says what is wrong)."""
    if any(a in ("-m", "--multirun") for a in argv):
        return []
    values = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith(("-", "~")))
    ckpt = values.get("ckpt_path")
    if not ckpt or "," in ckpt:
        return []
    try:
        run_cfg = find_run_config(resolve_ckpt_path(ckpt), values.get("run_config"))
    except Exception:
        return []
    given = {k.lstrip("+").split("@")[0] for k in values}
    added = []
    for line in run_overrides(run_cfg):
        key, sep, _ = line.partition("=")
        if not sep or key.startswith(("+", "~")) or key in given or key == "hparams_search":
            continue
        if "." not in key and (Path(CONF_DIR) / key).is_dir():
            added.append(line)
    return added


def with_run_groups(main):
    """Wrap an eval/sample Hydra entry point: the checkpoint's run's group choices (see
    :func:`run_group_choices`) go on the command line before Hydra composes it; they are
    not the user's overrides (:func:`hydra_overrides` leaves them out)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        if not args and not kwargs:
            _RUN_GROUPS[:] = run_group_choices(sys.argv[1:])
            sys.argv[1:1] = _RUN_GROUPS
        return main(*args, **kwargs)

    return wrapper


def hydra_overrides() -> list[str]:
    """This Hydra app's command-line overrides (``[]`` outside a Hydra app), without the
    group choices :func:`with_run_groups` added."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [o for o in HydraConfig.get().overrides.task if o not in _RUN_GROUPS]


def hydra_subdir(out_dir: Path) -> Path | None:
    """``out_dir``'s Hydra output subdir (``.hydra``, created), or None when disabled."""
    from hydra.core.hydra_config import HydraConfig

    subdir = ".hydra"
    if HydraConfig.initialized():
        subdir = HydraConfig.get().output_subdir
        if subdir is None:
            return None
    path = Path(out_dir) / subdir
    path.mkdir(parents=True, exist_ok=True)
    return path


def source_record(ckpt_path: str, run_cfg_path: Path, overrides: list[str]) -> dict:
    """What an eval or sample run started from: the checkpoint, its run dir, that run's
    overrides and group choices, and this command's overrides (``eval_overrides``)."""
    hydra_dir = Path(run_cfg_path).resolve().parent
    hydra_yaml = _read_yaml(hydra_dir / "hydra.yaml") or {}
    choices = (hydra_yaml.get("hydra", {}).get("runtime", {}) or {}).get("choices")
    return {
        "ckpt_path": str(Path(ckpt_path).resolve()),
        "run_dir": str(hydra_dir.parent),
        "run_config": str(Path(run_cfg_path).resolve()),
        "run_overrides": _read_yaml(hydra_dir / "overrides.yaml"),
        "run_choices": choices,
        "eval_overrides": list(overrides),
    }


def build_eval_config(cfg: DictConfig, overrides: list[str] | None = None, usage: str = ""):
    """``(effective config, ckpt path, run config path, checkpoint, overrides)`` for an
    eval or sample app's composed ``cfg``: the run's saved config with ``overrides``
    (default: the command line's) on top; every input is checked before anything is
    built."""
    usage = usage or (
        "python -m reptile_gen.eval ckpt_path=<run dir>/checkpoints/last.ckpt [overrides]"
    )
    if OmegaConf.is_missing(cfg, "ckpt_path") or cfg.get("ckpt_path") in (None, ""):
        raise ConfigError(f"ckpt_path is required: {usage}")
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path)
    run_cfg_path = find_run_config(ckpt_path, cfg.get("run_config"))
    checkpoint = load_checkpoint(ckpt_path)
    overrides = hydra_overrides() if overrides is None else list(overrides)
    run_cfg = load_run_config(run_cfg_path)
    from hydra.core.hydra_config import HydraConfig

    config_name = "eval"
    if HydraConfig.initialized() and HydraConfig.get().job.config_name:
        config_name = HydraConfig.get().job.config_name
    eff = apply_overrides(run_cfg, overrides, config_name, run_overrides(run_cfg_path))
    with open_dict(eff):
        eff.task_name = cfg.get("task_name", "eval")
        eff.ckpt_path = ckpt_path
        eff.run_config = str(run_cfg_path)
        eff.train = False
        eff.test = True
        eff.paths.output_dir = str(cfg.paths.output_dir)
    return eff, ckpt_path, run_cfg_path, checkpoint, overrides
