"""reptile_gen.cli: a run's saved config with the command line's overrides on top
(Hydra's compose API), and reading a saved config."""

from __future__ import annotations

import pytest
from conftest import compose_config
from omegaconf import OmegaConf, open_dict

from reptile_gen.cli import apply_overrides, find_run_config, load_run_config
from reptile_gen.utils.runtime import ConfigError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A Reptile run's saved config with a few values unlike the defaults."""
    out = tmp_path_factory.mktemp("run")
    cfg = compose_config(
        ["algorithm=reptile", "model.body.hidden_sizes=[16,16]", "trainer.max_steps=7"], out
    )
    with open_dict(cfg):
        del cfg["hydra"]
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))


def test_key_overrides_replace_only_their_key(saved):
    eff = apply_overrides(saved, ["task.num_test_tasks=6", "seed=0"], "eval")
    assert eff.task.num_test_tasks == 6 and eff.seed == 0
    assert eff.algorithm._target_.endswith("Reptile")  # the run's, not the default MAML
    assert list(eff.model.body.hidden_sizes) == [16, 16] and eff.trainer.max_steps == 7


def test_group_override_takes_the_whole_package(saved):
    eff = apply_overrides(saved, ["trainer=cpu"], "eval")
    assert eff.trainer.accelerator == "cpu" and eff.trainer.max_steps == 3000
    assert eff.algorithm._target_.endswith("Reptile")


def test_global_option_sets_what_it_changes(saved):
    eff = apply_overrides(saved, ["debug=fast"], "eval")
    assert eff.trainer.max_steps == 4 and eff.task.num_test_tasks == 8  # debug/fast.yaml
    assert eff.algorithm._target_.endswith("Reptile")
    assert list(eff.model.body.hidden_sizes) == [16, 16]


def test_global_option_that_swaps_a_group_replaces_its_node(saved):
    eff = apply_overrides(saved, ["experiment=digits_maml"], "eval")
    assert eff.task._target_.endswith("ImageDataModule") and eff.task.dataset == "digits"
    assert "x_range" not in eff.task  # no key of the sine task is left behind
    assert eff.algorithm._target_.endswith(".MAML")


def test_delete_and_no_overrides(saved):
    assert apply_overrides(saved, [], "eval") == saved
    eff = apply_overrides(saved, ["~tags"], "eval")
    assert "tags" not in eff and "tags" in saved


def test_load_run_config_errors(tmp_path):
    bad = tmp_path / "config.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_run_config(bad)
    bad.write_text("seed: 1\n")
    with pytest.raises(ConfigError, match="no algorithm node"):
        load_run_config(bad)
    with pytest.raises(FileNotFoundError, match="has no saved config"):
        find_run_config(tmp_path / "checkpoints" / "last.ckpt")
