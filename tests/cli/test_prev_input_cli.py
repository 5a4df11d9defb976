"""``task.prev_input=true`` through the real command lines: train a couple of steps on
text and digits, sample from the checkpoint (text generation, image completion), and the
clear one-line errors of a bad value and of the LSTM baseline."""

from __future__ import annotations

import json

import pytest
from conftest import TINY
from test_cli import check, run_cli, sample_three

TWO_STEPS = [*TINY, "trainer.max_steps=2", "trainer.val_check_interval=2"]


@pytest.mark.parametrize(
    "task, sample_args, produced",
    [
        (["task=text", "task.max_len=24"], ["prompt=Th"], "samples.txt"),
        (
            ["task=digits", "model.body.hidden_sizes=[16,16]", "task.pixel_order=random"],
            ["complete=random", "complete_fraction=0.3"],
            "completion.png",
        ),
    ],
    ids=["text", "digits"],
)
def test_train_and_sample_with_the_previous_element_as_input(tmp_path, task, sample_args, produced):
    run_dir = tmp_path / "run"
    args = [*TWO_STEPS, *task, "task.prev_input=true", f"hydra.run.dir={run_dir}"]
    check(run_cli(["-m", "reptile_gen.train", *args], tmp_path))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert any(k.startswith("test/nll_bits_per_") for k in metrics)
    config = (run_dir / ".hydra" / "config.yaml").read_text()
    assert "prev_input: true" in config
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    sample_three(ckpt, sample_args, produced, tmp_path)


@pytest.mark.parametrize(
    "args, starts",
    [
        (["task=digits", "task.prev_input=maybe"], "error: task.prev_input='maybe'; allowed"),
        (["task=text", "task.prev_input=1"], "error: task.prev_input=1; allowed: true, false"),
        (
            ["task=digits", "algorithm=lstm", "task.prev_input=true"],
            "error: task.prev_input=true with algorithm=lstm",
        ),
    ],
    ids=["not_a_bool", "an_integer", "lstm"],
)
def test_a_bad_value_is_one_error_line_and_exit_2(tmp_path, args, starts):
    proc = run_cli(["-m", "reptile_gen.train", *TINY, *args, f"hydra.run.dir={tmp_path}"], tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(starts), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
