"""One line per user error: bad config values of every group, bad data paths, unusable
checkpoints, impossible run dirs and a sweep with one bad job, through the entry points
(train, eval, sample in-process as the command line runs them; compare; the sweep as a
subprocess). Each prints ``error: <key>=...`` to stderr, exits with status 2, shows no
traceback and leaves an existing run dir as it was."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY
from hydra.core.global_hydra import GlobalHydra
from test_cli import run_cli

from reptile_gen import compare as compare_app
from reptile_gen import eval as eval_app
from reptile_gen import sample as sample_app
from reptile_gen import train as train_app
from reptile_gen.utils.user_errors import user_error_message


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Bad inputs on disk, and an existing run dir whose files must not change."""
    root = tmp_path_factory.mktemp("bad")
    made = {"root": root, "dir": root / "a_dir", "missing": root / "missing.txt"}
    made["dir"].mkdir()
    for name, content in {
        "empty": b"",
        "binary": bytes(range(256)) * 4,
        "utf16": "hello\nworld\n".encode("utf-16"),
        "latin1": "caf\xe9\n".encode("latin-1"),
        "truncated_ckpt": b"PK\x03\x04" + b"\x00" * 40,
        "random_ckpt": os.urandom(512),
        "a_file": b"x",
    }.items():
        path = root / name
        path.write_bytes(content)
        made[name] = path
    fake = root / "not_lightning.ckpt"
    torch.save({"weights": torch.zeros(2)}, fake)
    made["not_lightning"] = fake
    mismatched = root / "mismatched.ckpt"
    torch.save({"state_dict": {"model.layer.weight": torch.zeros(3, 3)}}, mismatched)
    made["mismatched"] = mismatched
    existing = root / "existing_run"
    (existing / ".hydra").mkdir(parents=True)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (existing / ".hydra" / name).write_text(f"# {name} of an earlier run\n")
    (existing / "metrics.json").write_text('{"test/mse_step_1": 0.5}\n')
    (existing / "csv" / "version_0").mkdir(parents=True)
    (existing / "csv" / "version_0" / "metrics.csv").write_text("step,val/loss\n9,1.0\n")
    made["existing"] = existing
    return made


def digest(run_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != "train.log"
    }


#: (id, entry point, overrides with {placeholders} from ``files``, key the line names)
CASES = [
    # config values, group by group
    ("seed", "train", ["seed=abc"], "seed="),
    ("seed_float", "train", ["seed=1.5"], "seed="),
    ("max_steps_0", "train", ["trainer.max_steps=0"], "trainer.max_steps=0"),
    ("max_steps_neg", "train", ["trainer.max_steps=-5"], "trainer.max_steps=-5"),
    ("max_steps_str", "train", ["trainer.max_steps=many"], "trainer.max_steps="),
    ("val_interval_0", "train", ["trainer.val_check_interval=0"], "trainer.val_check_interval=0"),
    ("val_interval_frac", "train", ["trainer.val_check_interval=0.5"], "val_check_interval=0.5"),
    ("log_every_0", "train", ["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps=0"),
    ("inner_lr_0", "train", ["algorithm.inner_lr=0"], "algorithm.inner_lr=0"),
    ("inner_lr_neg", "train", ["algorithm.inner_lr=-0.1"], "algorithm.inner_lr=-0.1"),
    ("inner_steps_0", "train", ["algorithm.inner_steps=0"], "algorithm.inner_steps=0"),
    ("objective", "train", ["algorithm.objective=bogus"], "algorithm.objective="),
    (
        "reptile_learned_lr",
        "train",
        ["algorithm=reptile", "algorithm.inner_lr_learned=scalar"],
        "algorithm.inner_lr_learned=",
    ),
    ("lr_schedule", "train", ["algorithm.inner_lr_schedule=step"], "algorithm.inner_lr_schedule="),
    (
        "lr_schedule_list",
        "train",
        ["algorithm.inner_lr_schedule=[1.0,-0.5]"],
        "algorithm.inner_lr_schedule=[1.0, -0.5]",
    ),
    (
        "lr_end_factor",
        "train",
        ["algorithm.inner_lr_schedule=exp", "algorithm.inner_lr_end_factor=0"],
        "algorithm.inner_lr_end_factor=0",
    ),
    (
        "lr_buckets_0",
        "train",
        ["algorithm.inner_lr_learned=per_step", "algorithm.inner_lr_buckets=0"],
        "algorithm.inner_lr_buckets=0",
    ),
    (
        "lr_buckets_not_per_step",
        "train",
        ["algorithm.inner_lr_buckets=4"],
        "algorithm.inner_lr_buckets=4",
    ),
    (
        "lowrank_per_parameter",
        "train",
        ["engine=lowrank", "algorithm.inner_lr_learned=per_parameter"],
        "algorithm.inner_lr_learned='per_parameter' with engine=lowrank",
    ),
    (
        "lowrank_momentum",
        "train",
        ["engine=lowrank", "algorithm.inner_momentum=0.9"],
        "algorithm.inner_momentum=0.9 with engine=lowrank",
    ),
    ("momentum_1", "train", ["algorithm.inner_momentum=1.0"], "algorithm.inner_momentum=1.0"),
    ("momentum_neg", "train", ["algorithm.inner_momentum=-0.5"], "algorithm.inner_momentum=-0.5"),
    (
        "compile_momentum",
        "train",
        ["engine.compile=true", "algorithm.inner_momentum=0.5"],
        "algorithm.inner_momentum=0.5 with engine.compile=True",
    ),
    (
        "higher_adam_momentum",
        "train",
        ["engine=higher", "engine.inner_optimizer.name=adam", "algorithm.inner_momentum=0.5"],
        "algorithm.inner_momentum=0.5 with engine.inner_optimizer={name: adam}",
    ),
    (
        "lstm_momentum",
        "train",
        ["algorithm=lstm", "+algorithm.inner_momentum=0.5"],
        "algorithm.inner_momentum=0.5 with LSTM",
    ),
    (
        "compile_per_step",
        "train",
        ["engine.compile=true", "algorithm.inner_lr_schedule=linear"],
        "engine.compile=True with inner rates",
    ),
    (
        "higher_chunks",
        "train",
        ["engine=higher", "+engine.chunk_size=2"],
        "chunk_size=2",
    ),
    (
        "higher_mixed",
        "train",
        ["engine=higher", "trainer.precision=bf16-mixed"],
        "trainer.precision=",
    ),
    ("hidden_0", "train", ["model.body.hidden_sizes=[0]"], "model.body.hidden_sizes="),
    ("model_option", "train", ["model=bogus"], "model=bogus: no such option; allowed: gated_mlp"),
    ("engine_option", "train", ["engine=jax"], "engine=jax: no such option; allowed: functional"),
    ("unknown_key", "train", ["algorithm.bogus_key=1"], "algorithm.bogus_key=1: not a key"),
    ("bad_syntax", "train", ["seed==1,"], "seed==1,: not a valid override"),
    ("moved_key", "train", ["algorithm.inner_loop=lowrank"], "moved; use engine=lowrank"),
    ("head_bias", "train", ["model.head_bias=bogus"], "model.head_bias="),
    ("meta_batch_0", "train", ["task.meta_batch_size=0"], "task.meta_batch_size=0"),
    ("num_val_0", "train", ["task.num_val_tasks=0"], "task.num_val_tasks=0"),
    ("support_range_outside", "train", ["task.support_x_range=[0.0,6.0]"], "not inside"),
    ("support_range_reversed", "train", ["task.support_x_range=[5.0,0.0]"], "low is not below"),
    ("x_range_not_pair", "train", ["task.x_range=[1.0,2.0,3.0]"], "task.x_range="),
    ("x_range_str", "train", ["task.x_range=[0.0,wide]"], "not a pair of numbers"),
    ("phase_range_inf", "train", ["task.phase_range=[0.0,inf]"], "task.phase_range="),
    (
        "lr_every_0",
        "train",
        ["callbacks.last_checkpoint.every_n_train_steps=0"],
        "every_n_train_steps=0",
    ),
    # data paths
    ("text_dir", "train", ["task=text", "task.path={dir}"], "task.path="),
    ("text_missing", "train", ["task=text", "task.path={missing}"], "task.path="),
    ("text_empty", "train", ["task=text", "task.path={empty}"], "task.path="),
    ("text_binary", "train", ["task=text", "task.path={binary}"], "task.path="),
    ("text_utf16", "train", ["task=text", "task.path={utf16}"], "task.path="),
    ("text_latin1", "train", ["task=text", "task.path={latin1}"], "task.path="),
    # checkpoints
    ("ckpt_missing", "train", ["ckpt_path={missing}"], "ckpt_path="),
    ("ckpt_truncated", "train", ["ckpt_path={truncated_ckpt}"], "ckpt_path="),
    ("ckpt_random", "train", ["ckpt_path={random_ckpt}"], "ckpt_path="),
    ("ckpt_not_lightning", "train", ["ckpt_path={not_lightning}"], "ckpt_path="),
    ("ckpt_mismatched", "train", ["ckpt_path={mismatched}"], "ckpt_path="),
    ("ckpt_last_none", "train", ["ckpt_path=last"], "ckpt_path="),
    # run dirs
    ("run_dir_under_file", "train", ["hydra.run.dir={a_file}/run"], "hydra.run.dir="),
    ("run_dir_is_file", "train", ["hydra.run.dir={a_file}"], "hydra.run.dir="),
    # eval
    ("eval_missing", "eval", ["ckpt_path={missing}"], "ckpt_path="),
    ("eval_truncated", "eval", ["ckpt_path={truncated_ckpt}"], "ckpt_path="),
    ("eval_not_lightning", "eval", ["ckpt_path={not_lightning}"], "ckpt_path="),
    # sample
    ("sample_no_ckpt", "sample", [], "ckpt_path"),
    (
        "sample_temperature_inf",
        "sample",
        ["ckpt_path={missing}", "temperature=inf"],
        "temperature=",
    ),
    ("sample_temperature_0", "sample", ["ckpt_path={missing}", "temperature=0"], "temperature=0"),
    (
        "sample_temperature_str",
        "sample",
        ["ckpt_path={missing}", "temperature=hot"],
        "temperature=",
    ),
    (
        "sample_fraction",
        "sample",
        ["ckpt_path={missing}", "complete_fraction=2"],
        "complete_fraction=2",
    ),
    ("sample_complete", "sample", ["ckpt_path={missing}", "complete=bogus"], "complete="),
    ("sample_num_0", "sample", ["ckpt_path={missing}", "num_samples=0"], "num_samples=0"),
    ("sample_path", "sample", ["ckpt_path={missing}", "path=dense"], "path='dense'"),
    ("sample_missing", "sample", ["ckpt_path={missing}"], "ckpt_path="),
    ("sample_truncated", "sample", ["ckpt_path={truncated_ckpt}"], "ckpt_path="),
]

MAINS = {"train": train_app.main, "eval": eval_app.main, "sample": sample_app.main}


def run_in_process(app: str, args: list[str], capsys, monkeypatch) -> tuple[int, str]:
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", [app, *args])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        MAINS[app]()
    captured = capsys.readouterr()
    return exit_.value.code, captured.err + captured.out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case, files, capsys, monkeypatch, tmp_path):
    name, app, overrides, key = case
    args = [o.format(**{k: str(v) for k, v in files.items()}) for o in overrides]
    run_dirs = [a for a in args if a.startswith("hydra.run.dir=")]
    existing = files["existing"]
    if not run_dirs:  # into an existing run (a resume): nothing of it may change
        into_existing = app == "train" and "task.path" not in " ".join(args)
        args.append(f"hydra.run.dir={existing if into_existing else tmp_path / 'run'}")
    before = digest(existing)
    code, output = run_in_process(app, [*TINY, *args], capsys, monkeypatch)
    lines = [line for line in output.splitlines() if line.startswith("error: ")]
    assert code == 2, output[-3000:]
    assert lines and key in lines[0], output[-3000:]
    assert "Traceback" not in output
    assert digest(existing) == before


def test_verbose_shows_the_traceback(capsys, monkeypatch, tmp_path):
    """``verbose=true`` re-raises: Hydra reports the error with its stack (exit 1)."""
    code, output = run_in_process(
        "train",
        [*TINY, "seed=abc", "+verbose=true", f"hydra.run.dir={tmp_path}"],
        capsys,
        monkeypatch,
    )
    assert code == 1 and "UserError: seed='abc'" in output


def test_user_error_message_follows_the_cause_chain():
    try:
        try:
            raise ValueError("task.path='x': bad")
        except ValueError as err:
            raise RuntimeError("Error in call to target") from err
    except RuntimeError as wrapped:
        assert user_error_message(wrapped) == "task.path='x': bad"
    assert user_error_message(ValueError("something inside torch")) is None


@pytest.mark.parametrize(
    "args",
    [["{missing}"], ["{dir}"], ["{dir}", "--steps", "x"], ["{dir}", "--metric", "nope"]],
    ids=["missing_dir", "no_runs", "bad_steps", "bad_metric"],
)
def test_compare_bad_input_exits_2(args, files, capsys):
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in args]
    with pytest.raises(SystemExit) as exit_:
        compare_app.main(argv)
    output = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), output


def test_sweep_with_one_bad_job(tmp_path):
    """``-m seed=abc,0``: the bad job prints its line, the good one still runs, and the
    sweep exits 2."""
    proc = run_cli(
        [
            "-m",
            "reptile_gen.train",
            "-m",
            *TINY,
            "trainer.max_steps=1",
            "test=false",
            "seed=abc,0",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        tmp_path,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: seed='abc'" in proc.stderr and "Traceback" not in proc.stderr
    assert "1 job(s) of this sweep failed" in proc.stderr
    assert (tmp_path / "sweep" / "1" / "checkpoints" / "last.ckpt").is_file()
