"""Training metrics are logged only on the steps the logger writes, as the mean since the
last write: a run that writes every 3 steps logs the 3-step means of the values a run that
writes every step logs (same seed, same training)."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest
import torch
from conftest import compose_config

from reptile_gen.train import train
from reptile_gen.utils.step_logs import RunningMeans, is_logging_step


def _train_rows(tmp_path, every: int) -> tuple[dict[int, float], dict]:
    cfg = compose_config(
        [
            "experiment=sine_maml",
            "logger=csv",
            "trainer.max_steps=7",
            "trainer.val_check_interval=7",
            f"trainer.log_every_n_steps={every}",
        ],
        output_dir=tmp_path / str(every),
    )
    metrics = train(cfg)
    path = tmp_path / str(every) / "csv" / "version_0" / "metrics.csv"
    with path.open() as f:
        rows = {
            int(r["step"]): float(r["train/meta_loss"])
            for r in csv.DictReader(f)
            if r.get("train/meta_loss")
        }
    return rows, metrics


def test_logged_value_is_the_mean_since_the_last_write(tmp_path):
    every_step, _ = _train_rows(tmp_path, 1)
    assert sorted(every_step) == list(range(7))
    every_third, metrics = _train_rows(tmp_path, 3)
    # the logger writes after steps 3 and 6 (0-based 2 and 5)
    assert sorted(every_third) == [2, 5]
    for step, window in ((2, [0, 1, 2]), (5, [3, 4, 5])):
        expected = sum(every_step[k] for k in window) / len(window)
        assert every_third[step] == pytest.approx(expected, rel=1e-6)
    # the last step's window (step 7 alone) reaches callback_metrics and the progress bar
    assert metrics["train/meta_loss"] == pytest.approx(every_step[6], rel=1e-6)


def test_running_means():
    means = RunningMeans()
    means.add({"a": torch.tensor(1.0), "b": 2.0})
    means.add({"a": torch.tensor(3.0), "b": 4.0})
    assert {k: float(v) for k, v in means.pop().items()} == {"a": 2.0, "b": 3.0}
    means.add({"a": torch.tensor(5.0)})
    assert {k: float(v) for k, v in means.pop().items()} == {"a": 5.0}


@pytest.mark.parametrize(
    "global_step,every,max_steps,stop,expected",
    [(0, 3, 10, False, False), (2, 3, 10, False, True), (7, 3, 10, False, False),
     (9, 3, 10, False, True), (4, 3, -1, True, True), (4, 0, -1, False, False)],
)  # fmt: skip
def test_is_logging_step(global_step, every, max_steps, stop, expected):
    trainer = SimpleNamespace(
        log_every_n_steps=every, global_step=global_step, max_steps=max_steps, should_stop=stop
    )
    assert is_logging_step(SimpleNamespace(_trainer=trainer)) is expected
    assert is_logging_step(SimpleNamespace(_trainer=None)) is True
