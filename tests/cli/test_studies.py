"""The seed studies' commands (docs/studies.md), as subprocesses with a tiny budget: one
multirun trains every file of a study, one eval multirun scores its checkpoints on the
robustness split (5 support points from [0, 5]), and compare puts them in one table.
(Every experiment file also trains in-process: tests/cli/test_config.py.)"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import pytest
import yaml
from conftest import CONF_DIR, TINY, compose_config
from omegaconf import OmegaConf
from test_cli import check, run_cli

#: adaptation steps scored in training and in the robustness evaluation
EVAL_STEPS = 2

#: each study's multirun pattern and the files it must select (docs/studies.md)
STUDIES = {
    "sine_flux_*": ["sine_flux_fomaml", "sine_flux_reptile"],
    "sine_jax_*": ["sine_jax_fomaml", "sine_jax_maml", "sine_jax_naive", "sine_jax_reptile"],
    "mnist14_arch_*": [
        "mnist14_arch_gated_mlp",
        "mnist14_arch_lstm_block",
        "mnist14_arch_mlp",
        "mnist14_arch_reptile_gated_mlp",
        "mnist14_arch_reptile_lstm_block",
        "mnist14_arch_reptile_mlp",
    ],
    "mnist14_arch_reptile_*": [
        "mnist14_arch_reptile_gated_mlp",
        "mnist14_arch_reptile_lstm_block",
        "mnist14_arch_reptile_mlp",
    ],
    "text_arch_*": [
        "text_arch_gated_mlp",
        "text_arch_lstm_block",
        "text_arch_maml_gated_mlp",
        "text_arch_maml_lstm_block",
        "text_arch_maml_mlp",
        "text_arch_mlp",
    ],
}
#: the architecture x algorithm studies: the experiment whose task and rates they share
ARCH_STUDIES = {"text_arch_*": "listing", "mnist14_arch_*": "mnist14_maml"}
#: and the wall-clock of fitting every file of it gets
STUDY_BUDGET = {"text_arch_*": "00:00:02:00", "mnist14_arch_*": "00:00:04:00"}
#: and whether its MAML is first order (text: second order does not fit the budget)
FIRST_ORDER = {"text_arch_*": True, "mnist14_arch_*": False}
#: and where its task differs from that experiment's (text: the original's input, the
#: position alone, where the main job also reads the previous byte)
TASK_CHANGES = {"text_arch_*": {"prev_input": False}, "mnist14_arch_*": {}}
BODIES = {"MLP", "GatedMLP", "LSTMBlockStack"}
ALGORITHMS = {"MAML", "Reptile"}


@pytest.mark.parametrize("pattern", sorted(STUDIES))
def test_each_study_pattern_selects_its_files(pattern):
    names = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
    assert fnmatch.filter(names, pattern) == STUDIES[pattern]


@pytest.mark.parametrize("pattern", sorted(ARCH_STUDIES))
def test_an_arch_study_varies_only_the_network_and_the_algorithm(tmp_path, pattern):
    """Every (body, algorithm) pair once; the same task, widths, rates and time budget as
    the experiment the study is built on, tested at the end of the budget."""
    base = compose_config([f"experiment={ARCH_STUDIES[pattern]}"], tmp_path, tiny=False)
    pairs = set()
    for name in STUDIES[pattern]:
        cfg = compose_config([f"experiment={name}"], tmp_path / name, tiny=False)
        assert cfg.task_name == name
        assert OmegaConf.to_container(cfg.task) == {
            **OmegaConf.to_container(base.task),
            **TASK_CHANGES[pattern],
        }
        assert cfg.model.embedding_dim == base.model.embedding_dim
        assert cfg.model.body.hidden_sizes == base.model.body.hidden_sizes
        assert cfg.algorithm.inner_lr == base.algorithm.inner_lr
        assert cfg.algorithm.inner_batch_size == base.algorithm.inner_batch_size
        assert cfg.algorithm.optimizer._target_ == "torch.optim.Adam"
        assert cfg.algorithm.optimizer.lr == base.algorithm.optimizer.lr
        assert cfg.algorithm.scheduler is None
        assert cfg.trainer.max_time == STUDY_BUDGET[pattern] and cfg.trainer.max_steps >= 10**5
        assert cfg.test_best is False and cfg.baseline is None
        body = cfg.model.body._target_.rsplit(".", 1)[-1]
        algorithm = cfg.algorithm._target_.rsplit(".", 1)[-1]
        if algorithm == "MAML":
            assert cfg.algorithm.first_order is FIRST_ORDER[pattern]
        pairs.add((body, algorithm))
    assert pairs == {(b, a) for b in BODIES for a in ALGORITHMS}


@pytest.fixture(scope="module")
def flux_study(tmp_path_factory):
    """``-m 'experiment=glob(sine_flux_*)'`` (tiny): job 0 first-order MAML, job 1 Reptile."""
    project = tmp_path_factory.mktemp("study")
    sweep = project / "sine_flux"
    check(
        run_cli(
            [
                "-m",
                "reptile_gen.train",
                "-m",
                "experiment=glob(sine_flux_*)",
                *TINY,
                f"algorithm.eval_inner_steps={EVAL_STEPS}",
                f"hydra.sweep.dir={sweep}",
            ],
            project,
        )
    )
    return project, sweep


def test_the_study_multirun_trains_each_file(flux_study):
    _, sweep = flux_study
    for job, name in enumerate(STUDIES["sine_flux_*"]):
        config = yaml.safe_load((sweep / str(job) / ".hydra" / "config.yaml").read_text())
        assert config["task_name"] == name
        assert config["model"]["body"]["activation"] == "tanh"
        assert config["algorithm"]["inner_lr"] == 0.02
        metrics = json.loads((sweep / str(job) / "metrics.json").read_text())
        assert f"test/mse_step_{EVAL_STEPS}" in metrics


def test_robustness_eval_of_the_study_and_its_comparison(flux_study):
    project, sweep = flux_study
    ckpts = [sweep / str(job) / "checkpoints" / "last.ckpt" for job in (0, 1)]
    robust = project / "sine_flux_robust"
    check(
        run_cli(
            [
                "-m",
                "reptile_gen.eval",
                "-m",
                "ckpt_path=" + ",".join(str(c) for c in ckpts),
                "task.num_support=5",
                "task.support_x_range=[0.0,5.0]",
                "algorithm.eval_inner_steps=3",
                "trainer.enable_progress_bar=false",
                f"hydra.sweep.dir={robust}",
            ],
            project,
        )
    )
    for job in (0, 1):
        run_dir = robust / str(job)
        task = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())["task"]
        assert task["num_support"] == 5 and task["support_x_range"] == [0.0, 5.0]
        assert task["x_range"] == [-5.0, 5.0]  # the query still covers the whole range
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert "test/mse_step_3" in metrics and "test/mse_step_4" not in metrics
        assert (run_dir / "fit.png").is_file() and (run_dir / "learning_curve.png").is_file()
    proc = check(run_cli(["-m", "reptile_gen.compare", str(robust)], project, timeout=120))
    summary = json.loads((robust / "comparison.json").read_text())
    labels = [group["label"] for group in summary["groups"]]
    assert len(labels) == 2 and any("fomaml" in label for label in labels), proc.stdout
    assert any("reptile" in label for label in labels), proc.stdout
    assert (robust / "comparison.png").stat().st_size > 0


def test_the_text_arch_study_runs_as_one_command_and_compares(tmp_path):
    """``-m 'experiment=glob(text_arch_*)'`` (tiny): six jobs, each with its untrained
    network scored; compare tabulates them with one untrained reference per network."""
    sweep = tmp_path / "text_arch"
    check(
        run_cli(
            [
                "-m",
                "reptile_gen.train",
                "-m",
                "experiment=glob(text_arch_*)",
                *TINY,
                # ++: the multirun first composes the defaults (task=sine) with these
                "++task.max_len=12",
                "model.embedding_dim=8",
                "model.body.hidden_sizes=[8,8]",
                f"hydra.sweep.dir={sweep}",
            ],
            tmp_path,
        )
    )
    names = []
    for job in range(len(STUDIES["text_arch_*"])):
        metrics = json.loads((sweep / str(job) / "metrics.json").read_text())
        assert "test/nll_bits_per_char" in metrics
        assert "test/random_init/nll_bits_per_char" in metrics
        config = yaml.safe_load((sweep / str(job) / ".hydra" / "config.yaml").read_text())
        names.append(config["task_name"])
    assert sorted(names) == STUDIES["text_arch_*"]
    check(run_cli(["-m", "reptile_gen.compare", str(sweep)], tmp_path, timeout=120))
    summary = json.loads((sweep / "comparison.json").read_text())
    assert summary["metric"] == "nll_bits_per_char"
    assert len(summary["groups"]) == 6 and len(summary["random_init"]) == 3
    assert (sweep / "comparison.png").stat().st_size > 0
