"""The divergence guard: a run whose inner loop blows up stops at the first non-finite
value with exit status 3 and one line, keeps no checkpoint of the non-finite state and
records ``status: diverged`` in metrics.json; every JSON the project writes is strict."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_cli import run_cli

from reptile_gen.inner_loop.core.guard import Diverged, DivergenceGuard
from reptile_gen.utils.json_io import dumps, write_json
from reptile_gen.utils.user_errors import as_diverged

#: the spawned runs are tiny: one thread each (two DDP ranks share the cores)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def test_guard_names_tasks_and_inner_step():
    guard = DivergenceGuard()
    losses = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, float("nan")], [1.0, float("inf"), 1.0]])
    guard.check_losses("inner loss", losses)
    guard.check_losses("meta-loss", torch.tensor(float("nan")))  # the first one is kept
    with pytest.raises(Diverged) as caught:
        guard.check_before_step([], meta_step=12, rates=0.5)
    message = str(caught.value)
    assert message.startswith("diverged at meta-step 12: non-finite inner loss")
    assert "inner step 1 of tasks [1, 2]" in message and "inner_lr=0.5" in message
    assert caught.value.as_record()["diverged_at_step"] == 12
    # reset after raising: a finite step passes
    guard.check_before_step([], meta_step=13, rates=0.5)


def test_guard_checks_the_meta_gradient_and_can_be_off():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([0.0, float("inf")])
    with pytest.raises(Diverged, match="non-finite meta-gradient; in w"):
        DivergenceGuard().check_before_step([("w", p)], meta_step=3, rates=1.0)
    DivergenceGuard(enabled=False).check_before_step([("w", p)], meta_step=3, rates=1.0)


def test_as_diverged_reads_a_spawned_rank_traceback():
    text = (
        "Traceback ...\nreptile_gen.inner_loop.core.guard.Diverged: diverged at meta-step 4: "
        "non-finite meta-loss; value inf; inner rates inner_lr=1e+06\n"
    )
    found = as_diverged(RuntimeError(text))
    assert found is not None and found.meta_step == 4 and found.what == "meta-loss"
    # the same record as the rank's own error would give
    raised = Diverged("meta-loss", 4, "value inf", "inner_lr=1e+06")
    assert found.as_record() == raised.as_record()
    assert str(found) == str(raised)
    assert as_diverged(ValueError("something else")) is None


def test_strict_json(tmp_path):
    value = {"a": math.nan, "b": [math.inf, -math.inf, 1.5], "c": torch.tensor(float("nan"))}
    assert json.loads(dumps(value)) == {"a": None, "b": [None, None, 1.5], "c": None}
    path = write_json(tmp_path / "x.json", value)
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()


def test_diverging_run_exits_3_with_one_line(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        [
            "-m",
            "reptile_gen.train",
            "experiment=sine_maml",
            "algorithm.inner_lr=1e6",
            "trainer.max_steps=20",
            "trainer.enable_progress_bar=false",
            f"hydra.run.dir={run_dir}",
        ],
        tmp_path,
        env=ONE_THREAD,
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "diverged at meta-step 0" in lines[0], proc.stderr[-3000:]
    assert "inner_lr=1e+06" in lines[0]
    assert "Traceback" not in proc.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and metrics["diverged_at_step"] == 0
    # no checkpoint of the non-finite state
    assert not list(run_dir.glob("checkpoints/*.ckpt"))


def test_diverging_jobs_of_a_sweep_are_recorded_and_the_sweep_goes_on(tmp_path):
    proc = run_cli(
        [
            "-m",
            "reptile_gen.train",
            "-m",
            "experiment=sine_maml",
            "algorithm.inner_lr=1e6",
            "trainer.max_steps=5",
            "trainer.enable_progress_bar=false",
            "seed=0,1",
            f"hydra.sweep.dir={tmp_path}",
        ],
        tmp_path,
        env=ONE_THREAD,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("error: diverged at meta-step 0") == 2
    for job in ("0", "1"):
        assert json.loads((tmp_path / job / "metrics.json").read_text())["status"] == "diverged"


def test_diverging_ddp_run_exits_3(tmp_path):
    """Under trainer=ddp_cpu the spawned ranks raise at the same meta-step (the check
    follows the meta-gradient's all-reduce); the main process prints the line."""
    run_dir = tmp_path / "run"
    proc = run_cli(
        [
            "-m",
            "reptile_gen.train",
            "experiment=sine_maml",
            "trainer=ddp_cpu",
            "algorithm.inner_lr=1e6",
            "trainer.max_steps=5",
            "task.num_val_tasks=4",
            "task.num_test_tasks=4",
            "trainer.enable_progress_bar=false",
            f"hydra.run.dir={run_dir}",
        ],
        tmp_path,
        env=ONE_THREAD,
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "error: diverged at meta-step 0" in proc.stdout + proc.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "diverged"
