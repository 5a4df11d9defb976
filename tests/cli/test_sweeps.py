"""Hyperparameter search with the Optuna sweeper (``hparams_search=sine_optuna``) through
the real command line, its trials logged as W&B runs of one group (offline), and the
metric that train returns to a sweeper (``optimized_metric``)."""

from __future__ import annotations

import json
import math
import os

import pytest
import yaml
from conftest import TINY
from wandb_records import offline_runs, run_train

from reptile_gen.utils.runtime import ConfigError, optimized_value

N_TRIALS = 2
SEARCH = ["algorithm.inner_lr", "algorithm.optimizer.lr", "algorithm.inner_steps"]


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    """A 2-trial TPE search on tiny sine runs, each trial a W&B run with checkpoints."""
    home = tmp_path_factory.mktemp("optuna")
    sweep_dir = home / "search"
    proc = run_train(
        [
            "hparams_search=sine_optuna",
            f"hydra.sweeper.n_trials={N_TRIALS}",
            *[o for o in TINY if not o.startswith("logger=")],
            "logger=wandb",
            "logger.wandb.log_model=true",
            "algorithm.eval_inner_steps=2",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        home,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep_dir


def test_search_writes_best_params_of_its_trials(search):
    results = yaml.safe_load((search / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna"
    best = results["best_params"]
    assert sorted(best) == sorted(SEARCH)
    assert 0.001 <= best["algorithm.inner_lr"] <= 0.3
    assert 0.0001 <= best["algorithm.optimizer.lr"] <= 0.01
    assert (
        isinstance(best["algorithm.inner_steps"], int) and 1 <= best["algorithm.inner_steps"] <= 5
    )
    assert math.isfinite(results["best_value"])
    trials = []
    for job in range(N_TRIALS):
        job_dir = search / str(job)
        assert (job_dir / "metrics.json").is_file()
        overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
        params = dict(o.split("=", 1) for o in overrides if o.split("=")[0] in SEARCH)
        config = yaml.safe_load((job_dir / ".hydra" / "config.yaml").read_text())
        # the trial's parameters reached the run's config
        assert config["algorithm"]["inner_steps"] == int(params["algorithm.inner_steps"])
        assert config["algorithm"]["inner_lr"] == pytest.approx(float(params["algorithm.inner_lr"]))
        trials.append(params)
    assert trials[0] != trials[1]
    assert {k: str(v) for k, v in best.items()} in trials


def test_trials_are_wandb_runs_of_one_group_with_plots_and_checkpoints(search):
    runs = [offline_runs(search / str(job)) for job in range(N_TRIALS)]
    assert [len(r) for r in runs] == [1] * N_TRIALS
    runs = [r[0] for r in runs]
    assert len({r.run_id for r in runs}) == N_TRIALS
    assert {r.group for r in runs} == {search.name}
    assert all(r.exit_code == 0 for r in runs)
    for job, run in enumerate(runs):
        hydra_yaml = yaml.safe_load((search / str(job) / ".hydra" / "hydra.yaml").read_text())
        assert run.name == hydra_yaml["hydra"]["job"]["override_dirname"]
        assert "algorithm.inner_lr=" in run.name
    run = runs[0]
    config = yaml.safe_load((search / "0" / ".hydra" / "config.yaml").read_text())
    assert run.config["algorithm"]["inner_lr"] == config["algorithm"]["inner_lr"]
    assert run.config["optimized_metric"] == "val/loss"
    assert {"train/meta_loss", "val/loss", "test/mse_step_2"} <= run.history_keys
    metrics = json.loads((search / "0" / "metrics.json").read_text())
    assert run.summary["test/mse_step_2"] == pytest.approx(metrics["test/mse_step_2"])
    # learning_curve.png and fit.png as wandb.Image
    images = [p.name for p in run.media("images")]
    assert any(n.startswith("learning_curve_") for n in images), images
    assert any(n.startswith("fit_") for n in images), images
    # checkpoints as "model" artifacts, staged for `wandb sync`: the best and last.ckpt
    models = [a for a in run.artifacts if a.type == "model"]
    assert {a.name for a in models} == {f"model-{run.run_id}"}
    assert {c.path for a in models for c in a.manifest.contents} == {"model.ckpt"}
    assert any("best" in a.aliases for a in models) and any("last" in a.aliases for a in models)
    last = next(a for a in models if "last" in a.aliases).manifest.contents[0]
    assert (
        os.path.getsize(last.local_path)
        == (search / "0" / "checkpoints" / "last.ckpt").stat().st_size
    )


def test_missing_metric_in_a_search_is_a_clear_error(make_cfg):
    cfg = make_cfg(["hparams_search=sine_optuna", "optimized_metric=val/no_such"])
    metrics = {"val/loss": 0.5, "test/mse_step_1": 0.4, "data/corpus_sha256": "ab"}
    with pytest.raises(ConfigError) as err:
        optimized_value(cfg, metrics)
    message = str(err.value)
    assert "optimized_metric='val/no_such' is not a metric of this run" in message
    assert "OptunaSweeper" in message and "allowed: test/mse_step_1, val/loss" in message
    cfg = make_cfg(["hparams_search=sine_optuna", "optimized_metric=null"])
    with pytest.raises(ConfigError, match="optimized_metric=None is not set"):
        optimized_value(cfg, metrics)
    cfg = make_cfg(["hparams_search=sine_optuna", "optimized_metric=data/corpus_sha256"])
    with pytest.raises(ConfigError, match="is 'ab' in this run, not a number"):
        optimized_value(cfg, metrics)


WITHOUT_FAILING = "~hydra.callbacks.fail_non_finite_trials"


def test_search_gets_the_metric_and_nan_or_the_worst_for_a_diverged_trial(make_cfg):
    cfg = make_cfg(["hparams_search=sine_optuna"])
    assert optimized_value(cfg, {"val/loss": 0.25}) == 0.25
    # with the search files' FailNonFiniteTrials callback NaN is a failed trial
    assert math.isnan(optimized_value(cfg, {"val/loss": math.nan}))
    # without it Hydra's Optuna sweeper ends the whole study on a NaN: there it is the worst
    cfg = make_cfg(["hparams_search=sine_optuna", WITHOUT_FAILING])
    assert optimized_value(cfg, {"val/loss": math.nan}) == math.inf
    cfg = make_cfg(
        ["hparams_search=sine_optuna", WITHOUT_FAILING, "hydra.sweeper.direction=maximize"]
    )
    assert optimized_value(cfg, {"val/loss": math.nan}) == -math.inf


def test_a_non_finite_trial_is_failed_and_the_study_goes_on():
    import optuna

    from reptile_gen.utils.optuna_trials import FailNonFiniteTrials, StudyFailingNonFinite

    callback = FailNonFiniteTrials()
    callback.on_multirun_start()
    try:
        study = optuna.create_study(direction="minimize")
    finally:
        callback.on_multirun_end()
    studies = callback.studies
    for value in (math.nan, 2.0, math.inf, 1.0):
        study.tell(study.ask(), value)
    states = [t.state.name for t in study.trials]
    assert states == ["FAIL", "COMPLETE", "FAIL", "COMPLETE"]
    assert study.best_value == 1.0 and studies[0] is study
    assert studies[0].failed_trials == [0, 2]
    # outside the context, studies are Optuna's own again
    assert not isinstance(optuna.create_study(), StudyFailingNonFinite)


def test_search_with_diverging_trials_fails_them_and_finds_the_best(tmp_path):
    """Through the CLI: inner rate 1e7 diverges (exit 3 outside a sweep); in the search
    those trials are failed, their metrics.json says diverged, the best is a good one."""
    conf = tmp_path / "conf" / "hparams_search"
    conf.mkdir(parents=True)
    (conf / "diverging.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n  - sine_optuna\n"
        "hydra:\n  sweeper:\n    n_trials: 4\n    params:\n"
        "      algorithm.inner_lr: choice(0.01, 10000000.0)\n"
    )
    sweep_dir = tmp_path / "search"
    proc = run_train(
        [
            "--config-dir",
            str(tmp_path / "conf"),
            "hparams_search=diverging",
            *[o for o in TINY],
            f"hydra.sweep.dir={sweep_dir}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    statuses = {}
    for job in range(4):
        overrides = yaml.safe_load((sweep_dir / str(job) / ".hydra" / "overrides.yaml").read_text())
        rate = float(
            next(o for o in overrides if o.startswith("algorithm.inner_lr=")).split("=")[1]
        )
        metrics = json.loads((sweep_dir / str(job) / "metrics.json").read_text())
        statuses[job] = (rate, metrics.get("status"))
    assert {s for r, s in statuses.values() if r > 1} == {"diverged"}, statuses
    assert {s for r, s in statuses.values() if r < 1} <= {None, "ok", "completed"}, statuses
    assert {r for r, _ in statuses.values()} == {0.01, 1e7}, statuses
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_params"]["algorithm.inner_lr"] == 0.01
    assert math.isfinite(results["best_value"])
    assert "diverged at meta-step" in proc.stderr


@pytest.mark.parametrize("overrides", [[], ["hydra.mode=MULTIRUN"]])
def test_plain_runs_and_basic_sweeps_return_none_when_missing(make_cfg, overrides):
    cfg = make_cfg(overrides)
    assert optimized_value(cfg, {"test/mse_step_1": 0.4}) is None
    assert optimized_value(make_cfg([*overrides, "optimized_metric=null"]), {}) is None
    assert optimized_value(cfg, {"val/loss": 0.5}) == 0.5
