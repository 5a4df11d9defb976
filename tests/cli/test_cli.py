"""The real command lines, as subprocesses from the repo root: a 2 algorithms x 2 seeds
multirun of train, eval of one of its checkpoints into a new run dir, compare of the sweep
(seeds grouped: mean ± std), the clear error of a missing checkpoint, and the console
scripts."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, TINY

BIN = Path(sys.executable).parent
#: fewer adaptation steps scored than the default 10: each one costs time in test
EVAL_STEPS = 3


def run_cli(args, project_root, timeout=300, env=None) -> subprocess.CompletedProcess:
    """``python <args>`` from the repo root, offline, with outputs under ``project_root``
    (``env``: more environment variables)."""
    env = dict(os.environ, WANDB_MODE="offline", PROJECT_ROOT=str(project_root), **(env or {}))
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


def sample_three(ckpt, sample_args, produced, tmp_path) -> subprocess.CompletedProcess:
    """``reptile_gen.sample`` of three sequences from ``ckpt`` into ``tmp_path/sample``:
    ``produced`` (``samples.txt``: three lines that start with the prompt ``Th``; an image
    file: the three completed test images are reported) is written and not empty."""
    out_dir = tmp_path / "sample"
    sample = [f"ckpt_path={ckpt}", "num_samples=3", *sample_args, f"hydra.run.dir={out_dir}"]
    proc = check(run_cli(["-m", "reptile_gen.sample", *sample], tmp_path))
    assert (out_dir / produced).stat().st_size > 0
    if produced == "samples.txt":
        lines = (out_dir / produced).read_text(encoding="utf-8").splitlines()
        assert len(lines) == 3 and all(line.startswith("Th") for line in lines)
    else:
        assert "completed 3 test images" in proc.stdout
    return proc


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return tmp_path_factory.mktemp("project")


@pytest.fixture(scope="module")
def sweep(project):
    """``python -m reptile_gen.train -m algorithm=maml,reptile seed=0,1`` (tiny) into a
    sweep dir: jobs 0, 1 are MAML with seeds 0, 1; jobs 2, 3 Reptile."""
    sweep_dir = project / "sweep"
    check(
        run_cli(
            [
                "-m",
                "reptile_gen.train",
                "-m",
                "algorithm=maml,reptile",
                "seed=0,1",
                *TINY,
                f"algorithm.eval_inner_steps={EVAL_STEPS}",
                f"hydra.sweep.dir={sweep_dir}",
            ],
            project,
        )
    )
    return sweep_dir


def test_multirun_writes_one_run_dir_per_job(sweep):
    jobs = [("0", "maml", 0), ("1", "maml", 1), ("2", "reptile", 0), ("3", "reptile", 1)]
    for job, algorithm, seed in jobs:
        run_dir = sweep / job
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert f"test/mse_step_{EVAL_STEPS}" in metrics
        assert (run_dir / "checkpoints" / "last.ckpt").is_file()
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
        assert f"algorithm={algorithm}" in overrides and f"seed={seed}" in overrides


def test_eval_of_a_checkpoint_writes_a_new_run_dir(sweep, project):
    train_dir = sweep / "2"  # a Reptile job: not the eval app's default algorithm
    train_metrics = (train_dir / "metrics.json").read_text()
    runs = project / "outputs" / "eval" / "runs"
    before = set(runs.iterdir()) if runs.exists() else set()
    proc = check(
        run_cli(
            [
                "-m",
                "reptile_gen.eval",
                f"ckpt_path={train_dir / 'checkpoints' / 'last.ckpt'}",
                "task.num_test_tasks=6",
                "trainer.enable_progress_bar=false",
            ],
            project,
        )
    )
    new = set(runs.iterdir()) - before
    assert len(new) == 1, (new, proc.stderr[-2000:])
    eval_dir = new.pop()
    assert eval_dir != train_dir
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert f"test/mse_step_{EVAL_STEPS}" in metrics and "test/random_init/mse_step_0" in metrics
    assert metrics["ckpt_path"].endswith("last.ckpt")
    assert (eval_dir / "learning_curve.png").is_file() and (eval_dir / "fit.png").is_file()
    hydra_dir = eval_dir / ".hydra"
    config = yaml.safe_load((hydra_dir / "config.yaml").read_text())
    assert config["algorithm"]["_target_"].endswith("Reptile")  # the run's own config
    assert config["task"]["num_test_tasks"] == 6  # with the override on top
    assert config["task"]["num_val_tasks"] == 4  # and the run's own overrides kept
    assert "task.num_test_tasks=6" in yaml.safe_load((hydra_dir / "overrides.yaml").read_text())
    source = yaml.safe_load((hydra_dir / "eval_source.yaml").read_text())
    assert Path(source["run_dir"]) == train_dir.resolve()
    assert (train_dir / "metrics.json").read_text() == train_metrics  # the run is untouched


def test_eval_missing_checkpoint_fails_clearly(project, tmp_path):
    missing = tmp_path / "no_such.ckpt"
    proc = run_cli(["-m", "reptile_gen.eval", f"ckpt_path={missing}"], project, timeout=120)
    assert proc.returncode != 0
    assert f"ckpt_path='{missing}': no such checkpoint file" in proc.stderr


def test_compare_of_the_sweep(sweep, project):
    proc = check(run_cli(["-m", "reptile_gen.compare", str(sweep)], project, timeout=120))
    assert "algorithm=maml" in proc.stdout and "algorithm=reptile" in proc.stdout
    assert "random init" in proc.stdout
    assert (sweep / "comparison.png").stat().st_size > 0
    assert "| label" in (sweep / "comparison.md").read_text()
    summary = json.loads((sweep / "comparison.json").read_text())
    assert [g["label"] for g in summary["groups"]] == ["algorithm=maml", "algorithm=reptile"]
    for group, jobs in zip(summary["groups"], (("0", "1"), ("2", "3"))):
        # one group per algorithm over its two seeds: mean and sample std of their curves
        assert group["n"] == 2 and sorted(group["seeds"]) == [0, 1]
        assert len(group["mean"]) == EVAL_STEPS + 1
        curves = [json.loads((sweep / j / "metrics.json").read_text()) for j in jobs]
        for k in range(EVAL_STEPS + 1):
            values = [c[f"test/mse_step_{k}"] for c in curves]
            assert group["mean"][k] == pytest.approx(sum(values) / 2)
            assert group["std"][k] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    assert "| algorithm=maml    | 2       |" in proc.stdout and " ± " in proc.stdout


def test_compare_without_runs_fails_clearly(project, tmp_path):
    proc = run_cli(["-m", "reptile_gen.compare", str(tmp_path)], project, timeout=120)
    assert proc.returncode == 2 and "no metrics.json found" in proc.stderr


@pytest.mark.parametrize("name", ["reptile-gen-train", "reptile-gen-eval", "reptile-gen-compare"])
def test_console_scripts_exist(name):
    script = BIN / name
    assert script.is_file() and os.access(script, os.X_OK), f"{script} missing: pip install -e ."


@pytest.mark.parametrize("name", ["reptile-gen-train", "reptile-gen-eval", "reptile-gen-sample"])
def test_console_scripts_find_the_configs_from_any_directory(name, tmp_path):
    """A console script imports the module (no ``python -m``): its Hydra app must still
    find conf/ when started outside the repository."""
    done = subprocess.run(
        [str(BIN / name), "--cfg", "job", "ckpt_path=x"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "task:" in done.stdout


def test_train_with_a_compiled_meta_step(project, tmp_path):
    """``experiment=sine_maml engine.compile=true``: meta-training steps through the
    torch.compile-d programs (Inductor, C++), evaluation on the eager path; the run
    writes its metrics. Reptile has no meta-gradient through the loop to compile."""
    run_dir = tmp_path / "compiled"
    check(
        run_cli(
            [
                "-m",
                "reptile_gen.train",
                "experiment=sine_maml",
                "engine.compile=true",
                *TINY,
                f"algorithm.eval_inner_steps={EVAL_STEPS}",
                f"hydra.run.dir={run_dir}",
            ],
            project,
        )
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert math.isfinite(metrics[f"test/mse_step_{EVAL_STEPS}"])
    proc = run_cli(
        ["-m", "reptile_gen.train", "algorithm=reptile", "engine.compile=true", *TINY,
         f"hydra.run.dir={tmp_path / 'reptile'}"],
        project,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "engine.compile=True with Reptile" in proc.stderr


@pytest.mark.parametrize("engine", ["functional", "lowrank"])
def test_train_with_per_step_inner_rates(project, tmp_path, engine):
    """``task=digits`` MAML with learned per-layer per-step rates (4 buckets of the 64
    steps) on a cosine schedule: the run trains and scores, its checkpoint holds one
    rate per tensor per bucket, moved by the meta-gradient."""
    import torch

    run_dir = tmp_path / "per_step"
    check(
        run_cli(
            [
                "-m",
                "reptile_gen.train",
                "task=digits",
                "algorithm=maml",
                f"engine={engine}",
                "model.body.hidden_sizes=[16,16]",
                "algorithm.inner_lr_learned=per_layer_per_step",
                "algorithm.inner_lr_buckets=4",
                "algorithm.inner_lr_schedule=cosine",
                "algorithm.inner_lr_end_factor=0.5",
                *TINY,
                f"hydra.run.dir={run_dir}",
            ],
            project,
        )
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert math.isfinite(metrics["test/nll_bits_per_pixel"])
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    rates = {k: v for k, v in state.items() if k.startswith("inner_lr.rates.")}
    assert rates and all(v.shape == (4,) for v in rates.values())
    init = yaml.safe_load((REPO_ROOT / "conf" / "algorithm" / "maml.yaml").read_text())["inner_lr"]
    assert any((v - init).abs().max() > 0 for v in rates.values())


def test_eval_and_sample_take_keys_only_the_runs_task_has(project, tmp_path):
    """The eval/sample apps' own default task is sine: the checkpoint's run's group
    choices are composed first, so a text-only key (``task.prev_input``, ``task.corpus``)
    is a valid override there, and it is recorded as the user's only override."""
    run_dir = tmp_path / "text_run"
    check(
        run_cli(
            [
                "-m",
                "reptile_gen.train",
                "task=text",
                "task.max_len=24",
                "debug=fast",
                "logger=none",
                f"hydra.run.dir={run_dir}",
            ],
            project,
        )
    )
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    eval_dir = tmp_path / "eval"
    check(
        run_cli(
            [
                "-m",
                "reptile_gen.eval",
                f"ckpt_path={ckpt}",
                "task.prev_input=false",
                "task.num_test_tasks=2",
                f"hydra.run.dir={eval_dir}",
            ],
            project,
        )
    )
    source = yaml.safe_load((eval_dir / ".hydra" / "eval_source.yaml").read_text())
    assert source["eval_overrides"] == [
        f"ckpt_path={ckpt}",
        "task.prev_input=false",
        "task.num_test_tasks=2",
    ]
    sample_dir = tmp_path / "sample"
    check(
        run_cli(
            [
                "-m",
                "reptile_gen.sample",
                f"ckpt_path={ckpt}",
                "task.corpus=pydoc",
                "num_samples=2",
                f"hydra.run.dir={sample_dir}",
            ],
            project,
        )
    )
    assert (sample_dir / "samples.txt").is_file()
