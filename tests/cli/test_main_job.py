"""The main job (`make train` = experiment=listing) through the real CLI, shrunk: it tests,
draws samples from the untrained and the trained model, checks them against the `ls -l`
line format, trains the LSTM baseline for the same wall-clock on the same test lines,
records it in metrics.json and prints the comparison and the samples side by side."""

from __future__ import annotations

import json

import pytest
from test_cli import check, run_cli

TINY_MAIN = [
    "experiment=listing",
    "task.max_len=24",
    "task.num_val_tasks=4",
    "task.num_test_tasks=6",
    "model.embedding_dim=8",
    "model.body.hidden_sizes=[16]",
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "logger=none",
    "baseline.overrides=['algorithm.hidden_size=8','algorithm.num_layers=1',"
    "'algorithm.embedding_dim=4','trainer.val_check_interval=2']",
]


def test_main_job_prints_the_comparison_and_both_samples(tmp_path):
    run = tmp_path / "run"
    proc = check(run_cli(["-m", "reptile_gen.train", *TINY_MAIN, f"hydra.run.dir={run}"], tmp_path))
    out = proc.stdout
    block = out[out.index("== Reptile (listing) after") :]
    for row in ("Reptile (listing)", "baseline listing_lstm", "unigram reference"):
        assert row in block
    assert "untrained" in block and " | trained" in block
    assert "samples that parse as listing lines: untrained " in block

    metrics = json.loads((run / "metrics.json").read_text())
    baseline = json.loads((run / "baseline" / "metrics.json").read_text())
    assert metrics["baseline/experiment"] == "listing_lstm"
    assert metrics["baseline/test/nll_bits_per_char"] == baseline["test/nll_bits_per_char"]
    # the same six test lines for both
    assert metrics["test/num_sequences"] == baseline["test/num_sequences"] == 6
    assert metrics["baseline/steps"] >= 1
    # the meta-learner reads (position, previous byte); the LSTM baseline, which always
    # feeds the previous byte back, keeps its own input on the same lines
    assert "prev_input: true" in (run / ".hydra" / "config.yaml").read_text()

    trained = (run / "samples.txt").read_text(encoding="utf-8").splitlines()
    untrained = (run / "samples_untrained.txt").read_text(encoding="utf-8").splitlines()
    assert len(trained) == len(untrained) == 16
    checked = json.loads((run / "samples_check.json").read_text())
    assert checked["corpus"] == "listing" and checked["num_samples"] == 16
    assert 0.0 <= checked["untrained_share"] <= 1.0 and 0.0 <= checked["trained_share"] <= 1.0


def test_unknown_corpus_is_a_one_line_error(tmp_path):
    proc = run_cli(
        ["-m", "reptile_gen.train", "task=text", "task.corpus=prose", "train=false"], tmp_path
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: task.corpus='prose': no such corpus; allowed: pydoc | listing "
        "(or a file with task.path=<UTF-8 file>)"
    ]


@pytest.mark.slow
def test_a_briefly_trained_model_writes_more_ls_lines_than_the_untrained(tmp_path):
    """150 meta-steps of the real main job (no baseline): the share of samples that parse
    as `ls -l` lines rises above the untrained (unigram) model's; seeded, so the same run
    every time (~2-3 min on one core)."""
    run = tmp_path / "run"
    args = [
        "experiment=listing",
        "baseline=null",
        "trainer.max_time=null",
        "trainer.max_steps=150",
        "trainer.val_check_interval=150",
        "task.num_test_tasks=10",
        "logger=none",
    ]
    check(run_cli(["-m", "reptile_gen.train", *args, f"hydra.run.dir={run}"], tmp_path))
    checked = json.loads((run / "samples_check.json").read_text())
    assert checked["trained_share"] > checked["untrained_share"]
    assert checked["trained_share"] >= 0.25
