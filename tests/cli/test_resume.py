"""Resume: a training run killed with SIGKILL after a checkpoint and started again with
the same command (into the same run dir) ends with the parameters and test metrics of an
uninterrupted run; ``ckpt_path=last`` and ``auto_resume``; a corrupt or mismatched
checkpoint is a clear error that leaves the run dir as it was."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, compose_config

from reptile_gen.train import train
from reptile_gen.utils.runtime import (
    CheckpointError,
    ConfigError,
    check_resumable,
    load_checkpoint,
    resolve_ckpt_path,
)

TESTS_DIR = Path(__file__).resolve().parents[1]

#: a small sine run: 50 meta-steps, validated (and last.ckpt written) every 10
RUN = [
    "trainer.max_steps=50",
    "trainer.val_check_interval=10",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "task.num_val_tasks=4",
    "task.num_test_tasks=8",
    "task.eval_batch_size=4",
    "task.meta_batch_size=4",
    "algorithm.eval_inner_steps=3",
    "logger=csv",
    # score the final weights, so the test metrics check the end of training too
    "test_best=false",
    "seed=7",
]
#: slow after meta-step 35 (tests/slow_steps.py), so the run can be killed there: past the
#: checkpoint of step 30, with steps 31..35 done and lost
SLOW_AFTER = 35


def slow(marker: Path) -> list[str]:
    return [
        "+callbacks.slow._target_=slow_steps.SlowSteps",
        f"+callbacks.slow.after_step={SLOW_AFTER}",
        "+callbacks.slow.seconds=5",
        f"+callbacks.slow.marker={marker}",
    ]


def train_cmd(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "reptile_gen.train", *RUN, *overrides, f"hydra.run.dir={run_dir}"]


def cli_env() -> dict:
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=cli_env(), stdout=out, stderr=subprocess.STDOUT
        )


def run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=REPO_ROOT, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )


def finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    assert proc.wait(timeout=timeout) == 0, log.read_text()[-3000:]


def global_step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]


def dir_digest(run_dir: Path) -> dict[str, str]:
    """sha256 of every file of a run dir except train.log (a failed start appends its
    error there, which is where it belongs)."""
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != "train.log"
    }


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """``(uninterrupted run dir, resumed run dir, output of the resumed start)``: the same
    command twice, the second killed after its step-30 checkpoint and started again."""
    root = tmp_path_factory.mktemp("resume")
    full, killed, marker = root / "full", root / "killed", root / "marker"
    # the uninterrupted run goes on alongside the killed one
    reference = start(train_cmd(full), root / "full.log")
    victim = start(train_cmd(killed, *slow(marker)), root / "killed.log")
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert victim.poll() is None, (root / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the run never reached meta-step 35"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    last = killed / "checkpoints" / "last.ckpt"
    # killed past the checkpoint of step 30 (validation interval 10) and before step 40
    assert global_step(last) == 30
    assert not (killed / "metrics.json").exists()
    resumed = run(train_cmd(killed, *slow(marker)))  # the same command again
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    finish(reference, root / "full.log")
    return full, killed, resumed.stdout + resumed.stderr


def test_killed_run_resumes_to_the_uninterrupted_result(killed_and_resumed):
    full, killed, output = killed_and_resumed
    assert "the run dir already holds a last checkpoint" in output
    assert f"resuming from {killed / 'checkpoints' / 'last.ckpt'} (meta-step 30)" in output
    ours = torch.load(killed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    theirs = torch.load(full / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ours["global_step"] == theirs["global_step"] == 50
    assert ours["state_dict"].keys() == theirs["state_dict"].keys()
    for name, value in theirs["state_dict"].items():
        assert torch.equal(ours["state_dict"][name], value), name
    # the optimizer state too: the run would go on identically
    for a, b in zip(
        ours["optimizer_states"][0]["state"].values(),
        theirs["optimizer_states"][0]["state"].values(),
    ):
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key
    metrics = json.loads((killed / "metrics.json").read_text())
    expected = json.loads((full / "metrics.json").read_text())
    for key in ("fit_seconds", "segments"):
        metrics.pop(key), expected.pop(key)
    assert "test/mse_step_3" in metrics
    assert metrics == expected


def test_resumed_run_keeps_the_validation_history(killed_and_resumed):
    """The best-checkpoint callback's state comes back with last.ckpt: the resumed run
    picks the same best checkpoint as the uninterrupted one, and validates at the steps
    after the checkpoint (40, 50) without repeating step 30's validation."""
    full, killed, _ = killed_and_resumed

    def best(run_dir):
        ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
        state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint"))
        return Path(state["best_model_path"]).name, float(state["best_model_score"])

    assert best(killed) == best(full)


def csv_rows(run_dir: Path) -> list[dict]:
    import csv

    with open(run_dir / "csv" / "version_0" / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


def test_resumed_run_keeps_every_logged_row(killed_and_resumed):
    """metrics.csv is appended to across the kill: rows up to the checkpoint were flushed
    with it, rows after it are logged again once, and the merged file equals the
    uninterrupted run's (every step, the same values, the test rows)."""
    full, killed, _ = killed_and_resumed
    ours, theirs = csv_rows(killed), csv_rows(full)
    assert ours == theirs
    val_steps = [int(r["step"]) for r in ours if r["val/loss"]]
    assert val_steps == [9, 19, 29, 39, 49]
    assert any(r.get("test/mse_step_3") for r in ours)


def test_resumed_run_keeps_its_segments_and_total_fit_time(killed_and_resumed):
    full, killed, _ = killed_and_resumed
    metrics = json.loads((killed / "metrics.json").read_text())
    segments = metrics["segments"]
    assert [(s["from_step"], s["to_step"]) for s in segments] == [(0, 30), (30, 50)]
    assert metrics["fit_seconds"] == pytest.approx(
        sum(s["fit_seconds"] for s in segments), abs=0.01
    )
    assert json.loads((full / "metrics.json").read_text())["segments"][0]["to_step"] == 50


def test_ctrl_c_saves_at_the_interrupt_and_resumes_exactly(killed_and_resumed, tmp_path):
    """SIGINT during training: last.ckpt is saved at the end of that meta-step, exit 130;
    the same command resumes from it to the uninterrupted run's weights."""
    full, _, _ = killed_and_resumed
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    proc = start(train_cmd(run_dir, *slow(marker)), tmp_path / "run.log")
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the run never reached meta-step 35"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, (tmp_path / "run.log").read_text()[-3000:]
    output = (tmp_path / "run.log").read_text()
    assert "interrupted at meta-step" in output and "Traceback" not in output
    step = global_step(run_dir / "checkpoints" / "last.ckpt")
    assert 35 <= step < 40, step
    resumed = run(train_cmd(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ours = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    theirs = torch.load(full / "checkpoints" / "last.ckpt", weights_only=False)
    for name, value in theirs["state_dict"].items():
        assert torch.equal(ours["state_dict"][name], value), name
    assert csv_rows(run_dir) == csv_rows(full)


@pytest.fixture(scope="module")
def failed_starts(killed_and_resumed, tmp_path_factory):
    """Two starts that must fail, run side by side, each with its run dir's digest from
    before: ``ckpt_path=<truncated file>`` into the killed run's dir, and a plain re-run
    (auto-resume) of a copy of that dir whose last.ckpt is of another model (a real run
    with a narrower network)."""
    _, killed, _ = killed_and_resumed
    root = tmp_path_factory.mktemp("failed")
    truncated = root / "truncated.ckpt"
    data = (killed / "checkpoints" / "last.ckpt").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    other = compose_config(["model.body.hidden_sizes=[8]", "seed=7"], root / "other")
    train(other)
    mismatched = root / "mismatched"
    shutil.copytree(killed, mismatched)
    other_last = Path(other.paths.output_dir) / "checkpoints" / "last.ckpt"
    shutil.copyfile(other_last, mismatched / "checkpoints" / "last.ckpt")
    cases = {
        "corrupt": (killed, train_cmd(killed, f"ckpt_path={truncated}")),
        "mismatched": (mismatched, train_cmd(mismatched)),
    }
    before = {name: dir_digest(run_dir) for name, (run_dir, _) in cases.items()}
    procs = {name: start(cmd, root / f"{name}.log") for name, (_, cmd) in cases.items()}
    results = {}
    for name, proc in procs.items():
        code = proc.wait(timeout=240)
        run_dir = cases[name][0]
        results[name] = (code, (root / f"{name}.log").read_text(), run_dir, before[name])
    results["truncated"] = truncated
    return results


def test_corrupt_checkpoint_is_a_clear_error_and_the_run_dir_is_untouched(failed_starts):
    """``ckpt_path=<truncated file>`` into the existing run dir: the error names the file,
    and the run's checkpoints, metrics, CSV logs and .hydra files are as they were."""
    code, output, run_dir, before = failed_starts["corrupt"]
    truncated = failed_starts["truncated"]
    assert code != 0
    assert f"ckpt_path='{truncated}': cannot read the checkpoint" in output
    assert "corrupt, truncated" in output
    assert dir_digest(run_dir) == before


def test_auto_resume_from_a_mismatched_checkpoint_fails_clearly(failed_starts):
    """A run dir whose last.ckpt is of another model: auto-resume refuses it, naming the
    file and the differences, and changes nothing in the dir."""
    code, output, run_dir, before = failed_starts["mismatched"]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert code != 0
    assert f"ckpt_path='{last}' does not fit the model that this command's config" in output
    assert "different shapes" in output and "model.body.net.0.weight" in output
    assert dir_digest(run_dir) == before


# ---------------------------------------------------------------------- in-process
def test_resolve_ckpt_path(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    assert resolve_ckpt_path(None, run_dir, auto_resume=True) is None
    with pytest.raises(FileNotFoundError, match=r"ckpt_path='last': this run dir .* has no"):
        resolve_ckpt_path("last", run_dir)
    with pytest.raises(ConfigError, match="no run dir of its own"):
        resolve_ckpt_path("last")
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        resolve_ckpt_path(str(tmp_path / "none.ckpt"), run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(b"x")
    assert resolve_ckpt_path("last", run_dir) == str(last)
    assert resolve_ckpt_path(None, run_dir, auto_resume=True) == str(last)
    assert resolve_ckpt_path(None, run_dir, auto_resume=False) is None
    assert resolve_ckpt_path(str(last), tmp_path) == str(last)


def test_ckpt_path_last_resumes_the_current_run_dir(make_cfg):
    """``ckpt_path=last`` continues the run dir's own last.ckpt (3 -> 6 meta-steps)."""
    cfg = make_cfg(["trainer.val_check_interval=3"], name="run")
    train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert global_step(last) == 3
    train(make_cfg(["ckpt_path=last", "trainer.max_steps=6"], name="run"))
    assert global_step(last) == 6


def test_ckpt_path_last_without_a_checkpoint_never_starts_from_scratch(make_cfg):
    cfg = make_cfg(["ckpt_path=last"], name="empty")
    with pytest.raises(FileNotFoundError, match="has no checkpoints/last.ckpt"):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


@pytest.mark.parametrize("kind", ["random", "empty", "weights_only", "other_optimizer"])
def test_unusable_checkpoints_are_clear_errors(killed_and_resumed, make_cfg, tmp_path, kind):
    source = killed_and_resumed[1] / "checkpoints" / "last.ckpt"  # a sine MLP's, as below
    bad = tmp_path / f"{kind}.ckpt"
    if kind == "random":
        bad.write_bytes(os.urandom(4096))
        message = "cannot read the checkpoint"
    elif kind == "empty":
        bad.write_bytes(b"")
        message = "cannot read the checkpoint"
    else:
        checkpoint = load_checkpoint(source)
        if kind == "weights_only":
            del checkpoint["optimizer_states"]
            message = "holds weights only"
        else:  # an SGD state for the configured Adam
            sgd = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
            state = sgd.state_dict()
            params = checkpoint["optimizer_states"][0]["param_groups"][0]["params"]
            state["param_groups"][0]["params"] = params
            checkpoint["optimizer_states"] = [state]
            message = "optimizer state does not fit"
        torch.save(checkpoint, bad)
    resumed = make_cfg([f"ckpt_path={bad}"], name="resumed")
    with pytest.raises(CheckpointError, match=message) as err:
        train(resumed)
    assert str(bad) in str(err.value)
    assert not (Path(resumed.paths.output_dir) / "checkpoints").exists()


def test_check_resumable_accepts_a_checkpoint_of_the_same_model(killed_and_resumed, make_cfg):
    from reptile_gen.utils.instantiate import build_run

    last = killed_and_resumed[1] / "checkpoints" / "last.ckpt"
    _, module = build_run(make_cfg([], name="own"))
    check_resumable(load_checkpoint(last), module, last, "this config")
