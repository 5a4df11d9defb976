"""The engine config reaches the algorithm as one mapping, the algorithm classes say what
they are, and modules built from configs or checkpoints of the old shape (engine options
as algorithm keys) still load."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import CONF_DIR
from helpers import CONTINUOUS, make_model
from hydra.utils import get_class
from omegaconf import OmegaConf

from reptile_gen.algorithms import FOMAML, MAML, JointTraining, LSTMBaseline, Reptile
from reptile_gen.inner_loop import FunctionalEngine, HigherEngine, LowRankEngine
from reptile_gen.utils.config_compat import (
    ENGINE_KEYS,
    engine_options,
    explain_moved_key,
    find_moved_override,
    upgrade_config,
)
from reptile_gen.utils.instantiate import build_run

ENGINE_DIR = f"{CONF_DIR}/engine"


@pytest.mark.parametrize("name", sorted(ENGINE_KEYS))
def test_engine_yaml_holds_that_engines_options(name):
    with open(f"{ENGINE_DIR}/{name}.yaml") as f:
        assert yaml.safe_load(f) == engine_options(name)


@pytest.mark.parametrize(
    ("engine", "kind"),
    [
        (None, FunctionalEngine),
        ({"name": "functional", "chunk_size": 2, "compile": False}, FunctionalEngine),
        ({"name": "lowrank", "chunk_size": None}, LowRankEngine),
        ({"name": "higher", "inner_optimizer": {"name": "adam"}}, HigherEngine),
        (OmegaConf.create({"name": "higher", "inner_optimizer": {"name": "sgd"}}), HigherEngine),
    ],
    ids=["default", "functional", "lowrank", "higher-adam", "dictconfig"],
)
def test_the_engine_mapping_builds_the_engine_and_is_saved(engine, kind):
    module = MAML(make_model(), CONTINUOUS, engine=engine)
    assert isinstance(module.engine, kind)
    saved = module.hparams["engine"]
    assert type(saved) is dict and saved["name"] == module.engine.name
    if kind is FunctionalEngine and engine:
        assert module.engine.chunk_size == 2
    # the saved hyper-parameters rebuild the same engine
    again = MAML(make_model(), CONTINUOUS, **dict(module.hparams))
    assert type(again.engine) is kind


def test_an_unknown_engine_option_is_one_clear_line():
    with pytest.raises(ValueError, match=r"^engine.grad='fast': not an engine option; allowed"):
        MAML(make_model(), CONTINUOUS, engine={"name": "functional", "grad": "fast"})
    with pytest.raises(ValueError, match=r"'jax'; allowed: functional"):
        MAML(make_model(), CONTINUOUS, engine={"name": "jax"})
    with pytest.raises(ValueError, match=r"^engine='lowrank'; must be a mapping"):
        MAML(make_model(), CONTINUOUS, engine="lowrank")


# ---------------------------------------------------------------------- what a class is
@pytest.mark.parametrize(
    ("name", "display", "family", "inner_loop", "learns"),
    [
        ("maml", "MAML", "maml", True, True),
        ("fomaml", "first-order MAML", "maml", True, True),
        ("reptile", "Reptile", "reptile", True, False),
        ("joint", "joint (transfer)", "transfer", True, False),
        ("lstm", "LSTM", "likelihood", False, False),
    ],
)
def test_each_algorithm_class_says_what_it_is(name, display, family, inner_loop, learns):
    node = OmegaConf.load(f"{CONF_DIR}/algorithm/{name}.yaml")
    if "defaults" in node:  # fomaml: maml + first_order
        node = OmegaConf.merge(OmegaConf.load(f"{CONF_DIR}/algorithm/maml.yaml"), node)
    cls = get_class(node._target_)
    assert cls.display_name_for(node) == display
    assert (cls.family, cls.has_inner_loop, cls.learns_inner_lr) == (family, inner_loop, learns)


def test_instances_name_themselves():
    assert MAML(make_model(), CONTINUOUS, first_order=True).display_name == "first-order MAML"
    assert FOMAML(make_model(), CONTINUOUS).display_name == "first-order MAML"
    assert MAML(make_model(), CONTINUOUS).display_name == "MAML"
    assert Reptile.display_name == "Reptile" and JointTraining.display_name == "joint (transfer)"
    assert LSTMBaseline.display_name == "LSTM" and not LSTMBaseline.has_inner_loop


def test_a_new_algorithm_class_is_checked_by_its_attributes(make_cfg):
    """check_config reads the class, not its import path: a subclass under any name that
    gives inner rates no gradient refuses learned ones."""
    from reptile_gen.utils.runtime import ConfigError, check_config

    cfg = make_cfg(["algorithm=reptile", "+algorithm.inner_lr_learned=scalar"])
    cfg.algorithm._target_ = f"{__name__}.{NoRateGradient.__name__}"
    with pytest.raises(ConfigError, match=r"inner_lr_learned='scalar' with no-rate: this"):
        check_config(cfg)


class NoRateGradient(Reptile):
    display_name = "no-rate"


# ---------------------------------------------------------------------- the old shape
OLD_HPARAMS = {
    "inner_loop": "lowrank",
    "inner_optimizer": {"name": "sgd"},
    "inner_lr": 0.05,
    "inner_lr_learned": "none",
    "inner_steps": 2,
    "inner_batch_size": 1,
    "objective": "auto",
    "eval_inner_steps": 3,
    "eval_random_init": True,
    "vmap_chunk_size": 2,
    "checkpoint_segments": None,
    "truncate_steps": None,
    "compile": False,
    "first_order": False,
}


def test_old_checkpoint_hparams_rebuild_the_module(tmp_path):
    """A checkpoint written before the engine group (its hyper_parameters hold the engine
    options as algorithm keys) rebuilds its module, engine included, and loads."""
    old = MAML(make_model(), CONTINUOUS, engine={"name": "lowrank", "chunk_size": 2})
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": old.state_dict(), "hyper_parameters": dict(OLD_HPARAMS)}, path)
    checkpoint = torch.load(path, weights_only=False)
    hparams = upgrade_config(checkpoint["hyper_parameters"])
    assert hparams["engine"] == {"name": "lowrank", "chunk_size": 2, "fold": "auto"}
    assert not {"inner_loop", "vmap_chunk_size", "compile", "inner_optimizer"} & set(hparams)
    module = MAML(make_model(seed=1), CONTINUOUS, **hparams)
    assert isinstance(module.engine, LowRankEngine) and module.engine.chunk_size == 2
    module.load_state_dict(checkpoint["state_dict"])
    for a, b in zip(module.parameters(), old.parameters()):
        assert torch.equal(a, b)


def test_an_old_run_config_builds(make_cfg):
    """A saved run config of the old shape: the engine comes back from its algorithm
    keys, with only that engine's options, and builds the same module."""
    new = make_cfg(["engine=higher", "engine.inner_optimizer.name=adam"])
    old = OmegaConf.to_container(new, resolve=False)
    engine = old.pop("engine")
    old["algorithm"].update(
        inner_loop=engine["name"],
        inner_optimizer=engine["inner_optimizer"],
        vmap_chunk_size=None,
        compile=False,
    )
    upgraded = upgrade_config(OmegaConf.create(old))
    assert OmegaConf.to_container(upgraded.engine) == {
        "name": "higher",
        "inner_optimizer": {"name": "adam"},
    }
    assert "inner_loop" not in upgraded.algorithm
    _, module = build_run(upgraded)
    assert isinstance(module.engine, HigherEngine) and module.engine.inner_optimizer == "adam"
    # the new shape is left as it is
    same = upgrade_config(new)
    for key in ("algorithm", "engine"):
        assert OmegaConf.to_container(same[key]) == OmegaConf.to_container(new[key])


def test_an_old_lstm_run_config_gets_no_engine():
    old = {"algorithm": {"_target_": "reptile_gen.algorithms.LSTMBaseline", "hidden_size": 8}}
    assert "engine" not in upgrade_config(old)
    old["algorithm"]["_target_"] = "reptile_gen.algorithms.MAML"
    assert upgrade_config(old)["engine"] == engine_options("functional")


# ---------------------------------------------------------------------- old overrides
@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("algorithm.inner_loop=lowrank", "algorithm.inner_loop=lowrank: moved; use engine=lowrank"),
        (
            "algorithm.vmap_chunk_size=4",
            "algorithm.vmap_chunk_size=4: moved; use engine.chunk_size=4",
        ),
        ("+algorithm.compile=true", "algorithm.compile=true: moved; use engine.compile=true"),
        (
            "algorithm.inner_optimizer.name=adam",
            "algorithm.inner_optimizer.name=adam: moved; use engine=higher "
            "engine.inner_optimizer.name=adam",
        ),
        ("algorithm.inner_lr=0.1", None),
    ],
)
def test_old_overrides_name_the_new_key(override, line):
    got = explain_moved_key(override)
    if line is None:
        assert got is None and find_moved_override([override]) is None
    else:
        assert got.startswith(f"error: {line}") and "\n" not in got
        assert find_moved_override(["seed=1", override]) == got


def test_hydras_error_for_an_old_override_is_explained(make_cfg):
    with pytest.raises(Exception) as exc:
        make_cfg(["algorithm.inner_loop=lowrank"])
    assert explain_moved_key(exc.value) == (
        "error: algorithm.inner_loop=lowrank: moved; use engine=lowrank"
    )
    assert explain_moved_key(ValueError("something else")) is None
