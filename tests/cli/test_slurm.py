"""The submitit launcher on a real (one-node, localhost) Slurm cluster, started by
``make slurm-up`` (scripts/slurm_cluster.sh) before the suite; skipped when none is up.

One two-job multirun (``seed=1,2``) is sent through ``hydra/launcher=submitit_slurm``;
job 0 is preempted on the way (``scancel --signal=USR2``, submitit's signal) once it is
past meta-step 35. Checked: both jobs finish with their ``metrics.json``; job 0 saved
``last.ckpt`` at the meta-step the signal came in, was requeued by submitit through the
launcher, resumed from that checkpoint in its own run dir and finished; job 1 ran through.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO_ROOT

TESTS_DIR = Path(__file__).resolve().parents[1]
STATE_DIR = Path(os.environ.get("SLURM_STATE_DIR", "/tmp/reptile_gen_slurm"))
MAX_STEPS = 60
SLOW_AFTER = 35


def slurm_env() -> dict:
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1")
    if "SLURM_CONF" not in env and not Path("/etc/slurm/slurm.conf").is_file():
        if (STATE_DIR / "slurm.conf").is_file():
            env["SLURM_CONF"] = str(STATE_DIR / "slurm.conf")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def cluster_problem() -> str | None:
    """Why the Slurm tests cannot run here, or None when a cluster accepts jobs."""
    hint = "`make slurm-up` starts a one-node cluster (root; installs slurm-wlm and munge)"
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        return "hydra-submitit-launcher is not installed (pip install -e '.[slurm]')"
    if shutil.which("sinfo") is None:
        reason = STATE_DIR / "unavailable"
        why = reason.read_text().strip() if reason.is_file() else "Slurm is not installed"
        return f"no Slurm cluster: {why}; {hint}"
    try:
        states = subprocess.run(
            ["sinfo", "-h", "-o", "%t"], env=slurm_env(), capture_output=True, text=True, timeout=10
        )
    except subprocess.TimeoutExpired:
        return f"no Slurm cluster: sinfo does not answer; {hint}"
    if states.returncode != 0 or not re.search(r"\b(idle|mix|alloc)\b", states.stdout):
        detail = (states.stderr or states.stdout).strip().splitlines()[:1]
        return f"no Slurm cluster that accepts jobs ({detail}); {hint}"
    return None


PROBLEM = cluster_problem()
pytestmark = pytest.mark.skipif(PROBLEM is not None, reason=str(PROBLEM))


def squeue_ids(env: dict) -> set[str]:
    out = subprocess.run(
        ["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True, timeout=20
    )
    return set(out.stdout.split())


@pytest.fixture(scope="module")
def preempted_sweep(tmp_path_factory):
    """The sweep dir of the two-job multirun, job 0 preempted once; and the master's output."""
    sweep = tmp_path_factory.mktemp("slurm") / "sweep"
    env = slurm_env()
    before = squeue_ids(env)
    cmd = [
        sys.executable,
        "-m",
        "reptile_gen.train",
        "-m",
        "hydra/launcher=submitit_slurm",
        # two jobs side by side on the two-CPU test node; a time limit that submitit does not
        # count the signal against (it treats a signal in the last 10 minutes as a time-out)
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=30",
        "seed=1,2",
        f"trainer.max_steps={MAX_STEPS}",
        "trainer.val_check_interval=10",
        "trainer.enable_progress_bar=false",
        "task.num_val_tasks=4",
        "task.num_test_tasks=4",
        "task.eval_batch_size=4",
        "task.meta_batch_size=4",
        "algorithm.eval_inner_steps=2",
        "logger=none",
        # slow after meta-step 35 (tests/slow_steps.py): the moment to preempt job 0
        "+callbacks.slow._target_=slow_steps.SlowSteps",
        f"+callbacks.slow.after_step={SLOW_AFTER}",
        "+callbacks.slow.seconds=0.3",
        "+callbacks.slow.marker=${paths.output_dir}/slow_marker",
        f"hydra.sweep.dir={sweep}",
    ]
    log = sweep.parent / "master.log"
    with open(log, "w") as out:
        master = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        marker = sweep / "0" / "slow_marker"
        while not marker.exists():
            assert master.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "job 0 never reached meta-step 35"
            time.sleep(0.1)
        folders = [p.name for p in (sweep / ".submitit").iterdir() if p.name.endswith("_0")]
        assert len(folders) == 1, folders
        job0 = folders[0]  # <array job id>_0: the job of sweep/0
        subprocess.run(["scancel", "--signal=USR2", job0], env=env, check=True, timeout=30)
        assert master.wait(timeout=max(deadline - time.monotonic(), 1)) == 0, log.read_text()[
            -3000:
        ]
    finally:
        if master.poll() is None:
            master.kill()
        leftover = squeue_ids(env) - before
        if leftover:
            subprocess.run(["scancel", *sorted(leftover)], env=env, timeout=30)
    return sweep, job0


def job_log(sweep: Path, job: str) -> str:
    """The job's Slurm stdout (all its runs: submitit appends)."""
    return "".join(p.read_text() for p in sorted((sweep / ".submitit" / job).glob("*_log.out")))


def test_two_job_multirun_on_slurm_writes_both_jobs_metrics(preempted_sweep):
    sweep, _ = preempted_sweep
    for num, seed in (("0", 1), ("1", 2)):
        run_dir = sweep / num
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert "test/mse_step_2" in metrics and "test/random_init/mse_step_2" in metrics
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
        assert f"seed={seed}" in overrides
        ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
        assert ckpt["global_step"] == MAX_STEPS
    # the launcher's own files stay in the sweep dir
    assert (sweep / "multirun.yaml").is_file()
    assert len(list((sweep / ".submitit").glob("*_1/*_log.out"))) == 1


def test_preempted_job_is_requeued_and_resumes_from_its_checkpoint(preempted_sweep):
    sweep, job0 = preempted_sweep
    out = job_log(sweep, job0)
    last = sweep / "0" / "checkpoints" / "last.ckpt"
    # Lightning's SLURM environment is used with its own requeue handling off
    assert "Lightning's auto-requeue off" in out
    # submitit's signal: last.ckpt saved at the end of the meta-step it arrived in
    saved = re.search(rf"saved {re.escape(str(last))} at meta-step (\d+); handing SIGUSR2", out)
    assert saved, out[-3000:]
    step = int(saved.group(1))
    assert SLOW_AFTER <= step < MAX_STEPS
    # then requeued through the launcher's checkpoint (submitit) ...
    assert "this job is preempted" in out and f"Requeued job {job0}" in out
    # ... and the requeued job resumed from that checkpoint in its own run dir
    assert f"resuming from {last} (meta-step {step})" in out
    assert "Exiting after successful completion" in out
    assert out.index("Requeued job") < out.index(f"resuming from {last}")
    # the other job was never interrupted
    other = job_log(sweep, job0[: -len("_0")] + "_1")
    assert "resuming from" not in other and "Exiting after successful completion" in other
