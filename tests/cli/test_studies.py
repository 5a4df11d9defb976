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
from conftest import CONF_DIR, TINY
from test_cli import check, run_cli

#: adaptation steps scored in training and in the robustness evaluation
EVAL_STEPS = 2

#: each study's multirun pattern and the files it must select (docs/studies.md)
STUDIES = {
    "sine_flux_*": ["sine_flux_fomaml", "sine_flux_reptile"],
    "sine_jax_*": ["sine_jax_fomaml", "sine_jax_maml", "sine_jax_naive", "sine_jax_reptile"],
    "mnist14_arch_*": ["mnist14_arch_gated_mlp", "mnist14_arch_lstm_block", "mnist14_arch_mlp"],
}


@pytest.mark.parametrize("pattern", sorted(STUDIES))
def test_each_study_pattern_selects_its_files(pattern):
    names = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
    assert fnmatch.filter(names, pattern) == STUDIES[pattern]


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
