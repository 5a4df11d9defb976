"""Configs and checkpoints written before the ``engine`` config group still load.

The inner-loop engine and its options were algorithm keys; they are now the ``engine``
group (``conf/engine/*.yaml``)::

    algorithm.inner_loop=lowrank          ->  engine=lowrank
    algorithm.vmap_chunk_size=4           ->  engine.chunk_size=4
    algorithm.compile=true                ->  engine.compile=true
    algorithm.inner_optimizer.name=adam   ->  engine=higher engine.inner_optimizer.name=adam

:func:`upgrade_config` rewrites a saved run config (``.hydra/config.yaml``) or a
checkpoint's ``hyper_parameters`` into the new shape; :func:`explain_moved_key` turns an
old command-line override (or the error Hydra raises for it) into one line naming the new
key, and :func:`exit_on_moved_overrides` makes an entry point print it and stop.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable, Mapping

from omegaconf import DictConfig, OmegaConf

from reptile_gen.utils.user_errors import EXIT_USER_ERROR

__all__ = [
    "ENGINE_KEYS",
    "MOVED_KEYS",
    "engine_options",
    "exit_on_moved_overrides",
    "explain_moved_key",
    "find_moved_override",
    "moved_keys_in",
    "upgrade_config",
]

#: old algorithm key -> its key in the engine group (``name`` is the group's choice)
MOVED_KEYS = {
    "inner_loop": "name",
    "vmap_chunk_size": "chunk_size",
    "compile": "compile",
    "inner_optimizer": "inner_optimizer",
}

#: each engine's own options, as its ``conf/engine/<name>.yaml`` holds them
ENGINE_KEYS = {
    "functional": {"chunk_size": None, "compile": False},
    "lowrank": {"chunk_size": None, "fold": "auto"},
    "higher": {"inner_optimizer": {"name": "sgd"}},
}

_DEFAULT_ENGINE = "functional"


def engine_options(name: str) -> dict:
    """The default engine config ``{name: ..., **options}`` of engine ``name`` (the
    content of ``conf/engine/<name>.yaml``); an unknown name keeps only ``name``."""
    return {"name": name, **{k: _copy(v) for k, v in ENGINE_KEYS.get(name, {}).items()}}


def moved_keys_in(node: Mapping) -> list[str]:
    """The old engine keys that ``node`` (an algorithm config or hyper-parameters) holds."""
    return [key for key in MOVED_KEYS if key in node]


def _upgrade_node(node: dict) -> dict:
    """``node`` (a plain dict of algorithm keys) without the old engine keys, plus an
    ``engine`` entry built from them (only the chosen engine's own options)."""
    moved = {key: node.pop(key) for key in moved_keys_in(node)}
    name = str(moved.get("inner_loop") or _DEFAULT_ENGINE)
    engine = engine_options(name)
    for old, new in MOVED_KEYS.items():
        if old in moved and new != "name" and new in engine:
            engine[new] = moved[old]
    return engine


def upgrade_config(cfg):
    """A copy of ``cfg`` in the current config shape.

    ``cfg`` is a run's config (a mapping with an ``algorithm`` node, e.g. a saved
    ``.hydra/config.yaml``) or an algorithm's hyper-parameters (a checkpoint's
    ``hyper_parameters``). The old ``algorithm.inner_loop``, ``vmap_chunk_size``,
    ``compile`` and ``inner_optimizer`` become the ``engine`` node (top level of a run
    config, an ``engine`` entry of hyper-parameters) holding only that engine's options;
    a config already in the new shape comes back unchanged. A ``DictConfig`` comes back
    as a ``DictConfig`` (interpolations kept), anything else as a plain ``dict``.
    """
    as_dictconfig = isinstance(cfg, DictConfig)
    data = OmegaConf.to_container(cfg, resolve=False) if as_dictconfig else _copy(dict(cfg))
    algorithm = data.get("algorithm")
    if isinstance(algorithm, dict):
        if moved_keys_in(algorithm):
            engine = _upgrade_node(algorithm)
            if not isinstance(data.get("engine"), dict):
                data["engine"] = engine
        elif not isinstance(data.get("engine"), dict) and _has_inner_loop(algorithm):
            data["engine"] = engine_options(_DEFAULT_ENGINE)
    elif moved_keys_in(data):
        engine = _upgrade_node(data)
        data.setdefault("engine", engine)
    if not as_dictconfig:
        return data
    out = OmegaConf.create(data)
    OmegaConf.set_struct(out, OmegaConf.is_struct(cfg))
    return out


def _has_inner_loop(algorithm: dict) -> bool:
    """Whether the algorithm config's class runs an inner loop (a run config written
    before the engine group had no ``engine`` node at all)."""
    target = algorithm.get("_target_")
    if not target:
        return True
    try:
        from hydra.utils import get_class

        return bool(getattr(get_class(str(target)), "has_inner_loop", True))
    except Exception:  # an unknown class: the constructor reports it
        return True


def _copy(value):
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


# ---------------------------------------------------------------------- old overrides
_OLD_KEY = re.compile(
    r"(?P<prefix>[+~]{0,2})algorithm\.(?P<key>inner_loop|vmap_chunk_size|compile|inner_optimizer)"
    r"(?P<rest>(?:\.[\w]+)*)(?:=(?P<value>[^\s'\"]*))?"
)


def _new_spelling(key: str, rest: str, value: str | None) -> str:
    if key == "inner_loop":
        return f"engine={value}" if value else "engine=functional|lowrank|higher"
    new = f"engine.{MOVED_KEYS[key]}{rest}"
    shown = f"{new}={value}" if value is not None else new
    if key == "inner_optimizer":
        return f"engine=higher {shown}"
    if key == "compile":
        return f"{shown} (engine=functional)"
    return shown


def explain_moved_key(exc_or_override) -> str | None:
    """One line naming the new key when ``exc_or_override`` is an old engine key.

    ``exc_or_override`` is a command-line override (``algorithm.inner_loop=lowrank``,
    ``+algorithm.compile=true``, ...) or the exception Hydra or OmegaConf raised for one
    (its message and causes are searched). Returns e.g.
    ``error: algorithm.inner_loop=lowrank: moved; use engine=lowrank``, or None when it
    is about something else.
    """
    texts = []
    if isinstance(exc_or_override, BaseException):
        err = exc_or_override
        while err is not None and len(texts) < 8:
            texts.append(str(err))
            full_key = getattr(err, "full_key", None)
            if full_key:
                texts.append(str(full_key))
            err = err.__cause__ or err.__context__
    else:
        texts.append(str(exc_or_override))
    matches = [m for text in texts for m in _OLD_KEY.finditer(text)]
    if not matches:
        return None
    # Hydra's message names the key, then suggests "+algorithm.inner_loop=lowrank": the
    # one with the value says more
    match = next((m for m in matches if m["value"]), matches[0])
    key, rest, value = match["key"], match["rest"], match["value"]
    if match["prefix"].startswith("~"):
        value = None
    old = f"algorithm.{key}{rest}" + (f"={value}" if value is not None else "")
    return f"error: {old}: moved; use {_new_spelling(key, rest, value)}"


def find_moved_override(overrides) -> str | None:
    """:func:`explain_moved_key` of the first old engine key among ``overrides`` (command
    line arguments); None when there is none."""
    for override in overrides:
        text = str(override)
        if text.lstrip("+~").startswith("algorithm."):
            line = explain_moved_key(text)
            if line:
                return line
    return None


def exit_on_moved_overrides(main: Callable) -> Callable:
    """Wrap a Hydra entry point: an old engine key on the command line (which Hydra would
    refuse with a multi-line composition error) prints the one line of
    :func:`explain_moved_key` to stderr and exits with status 2 (a user error) before Hydra
    runs."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        if not args and not kwargs:
            line = find_moved_override(sys.argv[1:])
            if line:
                print(line, file=sys.stderr)
                raise SystemExit(EXIT_USER_ERROR)
        return main(*args, **kwargs)

    return wrapper


def explain_composition_error(argv, config_name: str = "config") -> str | None:
    """One ``error: ...`` line when Hydra cannot compose ``config_name`` with the
    command-line overrides in ``argv`` (an unknown group option, a key the config does not
    have, an override it cannot parse), else None. Sweeps (``a=1,2``) and Hydra's own
    flags other than ``-m`` are left to Hydra."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import MissingConfigException, OverrideParseException

    from reptile_gen import CONF_DIR

    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return None
    overrides = [a for a in argv if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as err:
        bad = next((o for o in overrides if f"'{o}'" in str(err)), str(err).splitlines()[0])
        detail = (str(err).splitlines()[1:2] or ["syntax"])[0]
        return (
            f"error: {bad}: not a valid override ({detail}); allowed: key=value, "
            "+key=value (a new key), ~key, group=option"
        )
    if any(o.is_sweep_override() for o in parsed):
        return None
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            compose(config_name, overrides=overrides)
    except MissingConfigException as err:
        group, _, option = str(err.missing_cfg_file or "").rpartition("/")
        text = next((o for o in overrides if o.lstrip("+~").split("=")[0] == group), None)
        if err.options and text:
            return f"error: {text}: no such option; allowed: {', '.join(err.options)}"
        return f"error: {str(err).splitlines()[0]}"
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        key = re.match(r"Could not override '([^']+)'", first)
        text = key and next((o for o in overrides if o.split("=")[0] == key[1]), None)
        if text:
            return (
                f"error: {text}: not a key of this config; allowed: the keys "
                f"`--cfg job` prints, or +{text} to add a new one"
            )
        return f"error: {first} (HYDRA_FULL_ERROR=1 shows the traceback)"
    finally:
        GlobalHydra.instance().clear()
    return None


def exit_on_bad_overrides(config_name: str) -> Callable:
    """Like :func:`exit_on_moved_overrides`, and a command line Hydra cannot compose
    ``config_name`` with is one ``error:`` line and exit status 2 before Hydra runs
    (:func:`explain_composition_error`), instead of Hydra's multi-line report."""

    def decorate(main: Callable) -> Callable:
        @functools.wraps(main)
        def wrapper(*args, **kwargs):
            if not args and not kwargs:
                argv = sys.argv[1:]
                line = find_moved_override(argv)
                if line is None and os.environ.get("HYDRA_FULL_ERROR") != "1":
                    line = explain_composition_error(argv, config_name)
                if line:
                    print(line, file=sys.stderr)
                    raise SystemExit(EXIT_USER_ERROR)
            return main(*args, **kwargs)

        return wrapper

    return decorate
