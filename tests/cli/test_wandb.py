"""``logger=wandb`` offline (never the network), read back from the runs'
``run-<id>.wandb`` records and ``files/media/``:

* through the real command line, a two-job text multirun whose first job fails
  (EarlyStopping on a metric that does not exist): two runs in one group, named by their
  overrides, both finished (exit codes 1 and 0; an unfinished run would swallow the next
  job's logging), config, metrics, and the text samples as a ``wandb.Table`` (the Optuna
  search in test_sweeps.py checks plots and checkpoints);
* in-process, a sine run that continues the first job's W&B run by its id;
* the mode logic (auto: WANDB_MODE, else online with a key, else offline) as units.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import TINY
from wandb_records import offline_runs, read_records, run_train

from reptile_gen.utils.runtime import ConfigError
from reptile_gen.utils.wandb_logging import has_api_key, resolve_mode

WANDB_TINY = [o for o in TINY if not o.startswith("logger=")] + ["logger=wandb"]
TEXT = ["task=text", "task.max_len=12"]
#: job 0 stops early on a metric no run logs: a job that fails after its W&B run started
STOP = [
    "+callbacks.stop._target_=pytorch_lightning.callbacks.EarlyStopping",
    "+callbacks.stop.monitor=val/no_such_metric,val/loss",
]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("wandb_project")


@pytest.fixture(scope="module")
def text_sweep(home):
    sweep_dir = home / "text_sweep"
    proc = run_train(["-m", *TEXT, *WANDB_TINY, *STOP, f"hydra.sweep.dir={sweep_dir}"], home)
    return sweep_dir, proc


def test_multirun_jobs_are_runs_of_one_group_finished_even_on_failure(text_sweep):
    sweep_dir, proc = text_sweep
    assert proc.returncode != 0, "the failing job must fail the multirun"
    assert "no_such_metric" in proc.stderr
    assert not (sweep_dir / "0" / "metrics.json").exists()
    assert (sweep_dir / "1" / "metrics.json").is_file()
    runs = [offline_runs(sweep_dir / job) for job in ("0", "1")]
    assert [len(r) for r in runs] == [1, 1], "one W&B run per job"
    (failed,), (ok,) = runs
    assert ok.run_id != failed.run_id, "the failed job's run was finished, not reused"
    assert ok.group == failed.group == sweep_dir.name  # the sweep dir (not below outputs/)
    for job, run in (("0", failed), ("1", ok)):
        hydra_yaml = yaml.safe_load((sweep_dir / job / ".hydra" / "hydra.yaml").read_text())
        assert run.name == hydra_yaml["hydra"]["job"]["override_dirname"]
    assert "+callbacks.stop.monitor=val/no_such_metric" in failed.name
    assert failed.exit_code == 1, "a failed job's W&B run is finished with its exit code"
    assert ok.exit_code == 0
    assert "train/meta_loss" in failed.history_keys  # it had started logging
    assert "train/meta_loss" in ok.history_keys and ok.config["callbacks"]["stop"]


def test_config_metrics_and_text_samples_table(text_sweep):
    sweep_dir, _ = text_sweep
    (run,) = offline_runs(sweep_dir / "1")
    # the resolved Hydra config, every group
    for key in ("task", "model", "algorithm", "trainer", "callbacks", "seed", "paths"):
        assert key in run.config, key
    assert run.config["task"]["max_len"] == 12
    assert run.config["paths"]["output_dir"] == str(sweep_dir / "1")
    assert run.config["callbacks"]["stop"]["monitor"] == "val/loss"
    # training, validation and test metrics, and metrics.json as the summary
    assert {"train/meta_loss", "val/loss", "test/nll_bits_per_char"} <= run.history_keys
    metrics = json.loads((sweep_dir / "1" / "metrics.json").read_text())
    assert run.summary["test/nll_bits_per_char"] == pytest.approx(metrics["test/nll_bits_per_char"])
    assert run.summary["fit_seconds"] == metrics["fit_seconds"]
    # samples.txt as a wandb.Table: one row per line
    assert run.summary["report/samples/_type"] == "table-file"
    (table_file,) = run.media("table")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["index", "sample"]
    lines = (sweep_dir / "1" / "samples.txt").read_text(encoding="utf-8").splitlines()
    assert [row[1] for row in table["data"]] == lines and len(lines) == 8


def test_id_continues_that_run(text_sweep, make_cfg, tmp_path, monkeypatch):
    """``logger.wandb.id=<id>``: the run resumes (``resume="allow"``) the W&B run of that
    id; here in-process, with the id of the sweep's successful job."""
    from reptile_gen.train import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    (first,) = offline_runs(text_sweep[0] / "1")
    cfg = make_cfg(
        [
            "logger=wandb",
            f"logger.wandb.id={first.run_id}",
            "trainer.max_steps=2",
            "algorithm.eval_inner_steps=1",
        ]
    )
    train(cfg)
    (run,) = offline_runs(cfg.paths.output_dir)
    assert run.run_id == first.run_id
    assert run.exit_code == 0 and run.group == ""  # a single run: no group
    assert run.config["task"]["_target_"].endswith("SineDataModule")
    assert {"train/meta_loss", "test/mse_step_1"} <= run.history_keys
    assert {p.name.split("_")[0] for p in run.media("images")} >= {"learning", "fit"}


def test_record_reader_agrees_with_wandb_leet_inspect(text_sweep):
    """This test suite's reader against wandb's own (``wandb leet inspect --json``)."""
    (log_file,) = (text_sweep[0] / "1").glob("wandb/offline-run-*/run-*.wandb")
    leet = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "wandb"), "leet", "inspect", "--json"]
        + [str(log_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if leet.returncode != 0 or not leet.stdout.strip():
        pytest.skip(f"wandb leet inspect unavailable: {leet.stderr[-500:]}")
    theirs = [json.loads(line)["type"] for line in leet.stdout.splitlines() if line.strip()]
    ours = [r.WhichOneof("record_type") for r in read_records(log_file)]
    assert ours == theirs


# ---------------------------------------------------------------------- mode logic
@pytest.mark.parametrize(
    "mode, env, expected",
    [
        ("auto", {}, "offline"),  # no key: offline
        ("auto", {"WANDB_API_KEY": "k" * 40}, "online"),  # a key: stream
        ("auto", {"WANDB_MODE": "online", "WANDB_API_KEY": "k" * 40}, "online"),
        ("auto", {"WANDB_MODE": "disabled", "WANDB_API_KEY": "k" * 40}, "disabled"),
        ("auto", {"WANDB_MODE": "offline", "WANDB_API_KEY": "k" * 40}, "offline"),
        ("auto", {"WANDB_MODE": "dryrun"}, "offline"),  # wandb's legacy spelling
        (None, {}, "offline"),
        ("online", {"WANDB_MODE": "offline"}, "online"),  # an explicit mode wins
        ("disabled", {}, "disabled"),
    ],
)
def test_resolve_mode(mode, env, expected, monkeypatch, tmp_path):
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    assert resolve_mode(mode, env) == expected


def test_a_wandb_login_netrc_counts_as_a_key(monkeypatch, tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {'a' * 40}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert has_api_key({}) and resolve_mode("auto", {}) == "online"
    assert not has_api_key({"WANDB_BASE_URL": "https://wandb.example.org"})


@pytest.mark.parametrize("mode, env", [("cloud", {}), ("auto", {"WANDB_MODE": "sometimes"})])
def test_bad_mode_is_a_clear_error(mode, env, monkeypatch, tmp_path):
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    with pytest.raises(ConfigError, match="allowed: .*online.*offline.*disabled"):
        resolve_mode(mode, env)
