"""The real configs, composed with Hydra's compose API: every algorithm x model x engine
builds and takes a meta-gradient, a representative set trains, every experiment file runs
with a tiny budget, and every bad input is a clear error before training starts (for
train and for eval)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR, compose_config
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException, MissingConfigException
from omegaconf import DictConfig, OmegaConf, open_dict

from reptile_gen.eval import CheckpointError, build_eval_config, evaluate
from reptile_gen.train import train
from reptile_gen.utils.instantiate import build_run
from reptile_gen.utils.runtime import ConfigError

ALGORITHMS = ["maml", "fomaml", "reptile", "joint"]
MODELS = ["mlp", "gated_mlp", "lstm_block", "siren"]
ENGINES = ["functional", "higher"]  # lowrank: tests/inner_loop/test_lowrank_engine.py
TASKS = ["sine"]
EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))

#: adaptation steps scored in the training tests (the default 10 only costs time)
FEW_STEPS = 3
#: what a bad input may raise: our own errors, or Hydra's wrapper around a constructor's
BAD_INPUT = (ValueError, FileNotFoundError, InstantiationException)


def _grads(module) -> list[torch.Tensor]:
    return [p.grad for p in module.parameters() if p.grad is not None]


# ---------------------------------------------------------------------- every combination
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("task", TASKS)
def test_every_combination_builds_and_backprops(make_cfg, task, algorithm, model, engine):
    cfg = make_cfg(
        [
            f"task={task}",
            f"algorithm={algorithm}",
            f"model={model}",
            f"engine={engine}",
        ]
    )
    datamodule, module = build_run(cfg)
    assert module.engine.name == engine
    batch = datamodule.sample(torch.Generator().manual_seed(0), 3)
    loss, logs = module.meta_loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = _grads(module)
    assert grads, "no parameter received a meta-gradient"
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(
    "overrides",
    [
        ["algorithm=maml", "model=mlp"],
        ["algorithm=fomaml", "model=gated_mlp", "engine=higher"],
        ["algorithm=reptile", "model=lstm_block", "algorithm.inner_steps=2"],
        ["algorithm=joint", "model=siren", "engine=higher"],
        [
            "algorithm=maml",
            "engine=higher",
            "engine.inner_optimizer.name=adam",
            "algorithm.inner_lr_learned=per_tensor",
        ],
    ],
    ids=["maml-mlp", "fomaml-gated-higher", "reptile-lstm", "joint-siren-higher", "maml-adam"],
)
def test_representative_runs_train(make_cfg, tmp_path, overrides):
    cfg = make_cfg([*overrides, f"algorithm.eval_inner_steps={FEW_STEPS}"])
    metrics = train(cfg)
    last = metrics[f"test/mse_step_{FEW_STEPS}"]
    assert last == last and f"test/mse_step_{FEW_STEPS + 1}" not in metrics  # not NaN
    assert (tmp_path / "run" / "metrics.json").is_file()


# ---------------------------------------------------------------------- experiment files
#: per task family, what makes an experiment's sequences tiny, and its network (the
#: config still composes and trains exactly as written otherwise)
SHRINK_TASK = {
    "sine": [],
    "text": ["task.max_len=12"],
    "listing": ["task.max_len=12"],
    "mnist": ["task.resolution=7"],
    "digits": ["task.resolution=4"],
    "mnist14": ["task.resolution=7"],
}
SHRINK_MODEL = {
    "sine": [],
    "text": ["model.embedding_dim=8", "model.body.hidden_sizes=[8,8]"],
    "listing": ["model.embedding_dim=8", "model.body.hidden_sizes=[8,8]", "baseline=null"],
    "mnist": ["model.embedding_dim=4", "model.body.hidden_sizes=[8]", "model.body.input_layer=8"],
    "digits": ["model.embedding_dim=4"],
    "mnist14": ["model.embedding_dim=4", "model.body.hidden_sizes=[8]"],
}
#: the LSTM baseline builds its own network (the model group is unused)
SHRINK_LSTM = ["algorithm.hidden_size=8", "algorithm.num_layers=1", "algorithm.embedding_dim=4"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_with_a_tiny_budget(make_cfg, tmp_path, experiment):
    family, _, algorithm = experiment.partition("_")
    lstm = algorithm == "lstm"
    shrink = SHRINK_TASK[family] + (SHRINK_LSTM if lstm else SHRINK_MODEL[family])
    if family == "sine":
        shrink.append(f"algorithm.eval_inner_steps={FEW_STEPS}")
    cfg = make_cfg([f"experiment={experiment}", *shrink])
    assert cfg.trainer.max_steps == 3  # the test budget wins over the experiment's
    train(cfg)
    assert (tmp_path / "run" / "metrics.json").is_file()


VARIANTS = sorted(p.stem for p in (Path(CONF_DIR) / "variant").glob("*.yaml"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_gap_variant_runs_on_digits(make_cfg, tmp_path, variant):
    """The gap study's one-change variants (conf/variant/) on top of its experiment."""
    shrink = SHRINK_TASK["digits"] + SHRINK_MODEL["digits"]
    cfg = make_cfg(["experiment=digits_gap", f"variant={variant}", *shrink])
    assert cfg.trainer.max_steps == 3
    train(cfg)
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_the_sine_experiments_exist():
    if not EXPERIMENTS:
        pytest.skip("conf/experiment/ is empty")
    assert any(name.startswith("sine_") for name in EXPERIMENTS), EXPERIMENTS


# ---------------------------------------------------------------------- bad inputs (train)
def test_unknown_group_option_lists_the_options(make_cfg):
    with pytest.raises(MissingConfigException) as exc:
        make_cfg(["algorithm=foo"])
    message = str(exc.value)
    assert "foo" in message and "maml" in message and "reptile" in message


BAD = [
    (["algorithm.inner_lr=0"], "algorithm.inner_lr=0; must be a number > 0"),
    (["algorithm.inner_lr=-0.1"], "algorithm.inner_lr=-0.1; must be a number > 0"),
    (["algorithm.inner_steps=0"], "algorithm.inner_steps=0; must be an integer > 0"),
    (["task.num_support=0"], "task.num_support=0; must be an integer >= 1"),
    (
        ["+engine.inner_optimizer.name=adam"],
        "needs engine=higher: the functional engine runs plain SGD",
    ),
    (
        ["engine=higher", "engine.inner_optimizer.name=lbfgs"],
        "engine.inner_optimizer.name='lbfgs'; allowed with engine=higher: sgd",
    ),
    (["engine=higher", "+engine.chunk_size=4"], "higher does not support .*chunk_size=4"),
    (["+engine.grad=fast"], "engine.grad='fast': not an engine option; allowed: engine.chunk_size"),
    (
        ["algorithm=reptile", "+algorithm.inner_lr_learned=scalar"],
        "algorithm.inner_lr_learned='scalar' with Reptile.*allowed: none",
    ),
    (
        ["algorithm=joint", "+algorithm.inner_lr_learned=per_tensor"],
        r"algorithm.inner_lr_learned='per_tensor' with joint \(transfer\).*allowed: none",
    ),
    (["algorithm=reptile", "engine.compile=true"], "engine.compile=True with Reptile"),
    (["+algorithm.inner_loop=lowrank"], "algorithm.inner_loop=lowrank: moved; use engine=lowrank"),
    (
        ["algorithm.inner_lr_learned=bogus"],
        "inner_lr_learned='bogus'; allowed: none, scalar, per_tensor, per_parameter",
    ),
    (["algorithm.objective=foo"], "algorithm.objective='foo'; allowed: auto, query, online"),
    (
        ["algorithm=lstm", "task=digits", "engine=lowrank"],
        "engine=lowrank with LSTM: this algorithm has no inner loop",
    ),
    (["ckpt_path=/no/such/file.ckpt"], "ckpt_path='/no/such/file.ckpt': no such checkpoint file"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_input_is_a_clear_error_before_training(make_cfg, tmp_path, overrides, message):
    cfg = make_cfg(overrides)
    pattern = message if ".*" in message else re.escape(message)
    with pytest.raises(BAD_INPUT, match=pattern):
        train(cfg)
    run_dir = tmp_path / "run"
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.json").exists()


def test_cross_group_errors_are_config_errors(make_cfg):
    cfg = make_cfg(["algorithm=reptile", "+algorithm.inner_lr_learned=scalar"])
    with pytest.raises(ConfigError):
        train(cfg)


# ---------------------------------------------------------------------- bad inputs (eval)
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny Reptile run with its saved config, as `python -m reptile_gen.train` leaves it
    (Reptile, so that the eval app's own default, MAML, differs from the run's)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    cfg = compose_config(["algorithm=reptile", "model.body.hidden_sizes=[16,16]"], run_dir)
    train(cfg)
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir()
    with open_dict(cfg):
        del cfg["hydra"]
    (hydra_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return run_dir


def compose_eval(overrides, output_dir):
    """The eval app's composition of ``overrides``, with its run dir set to ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


def test_eval_applies_overrides_to_the_saved_config(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    cfg = compose_eval(
        [
            f"ckpt_path={ckpt}",
            "trainer=cpu",
            "task.num_test_tasks=6",
            "algorithm.eval_inner_steps=3",
            "engine=lowrank",
        ],
        tmp_path / "eval",
    )
    eff, *_ = build_eval_config(cfg)
    assert OmegaConf.to_container(eff.engine) == {
        "name": "lowrank",
        "chunk_size": None,
        "fold": "auto",
    }
    assert eff.algorithm._target_.endswith("Reptile")  # the run's, not the eval default
    assert list(eff.model.body.hidden_sizes) == [16, 16]
    assert eff.task.num_test_tasks == 6 and eff.algorithm.eval_inner_steps == 3
    assert eff.trainer.accelerator == "cpu" and eff.trainer.max_steps == 3000  # trainer/cpu
    assert eff.task_name == "eval" and eff.train is False
    assert eff.paths.output_dir == str(tmp_path / "eval")


def test_eval_with_run_config_of_a_moved_checkpoint(trained_run, tmp_path):
    moved = tmp_path / "moved.ckpt"
    shutil.copy(trained_run / "checkpoints" / "last.ckpt", moved)
    cfg = compose_eval([f"ckpt_path={moved}"], tmp_path / "eval")
    with pytest.raises(FileNotFoundError, match=r"has no saved config.*run_config="):
        evaluate(cfg)
    config = trained_run / ".hydra" / "config.yaml"
    cfg = compose_eval(
        [f"ckpt_path={moved}", f"run_config={config}", "task.num_test_tasks=6"],
        tmp_path / "eval",
    )
    metrics = evaluate(cfg)
    assert "test/mse_step_10" in metrics and (tmp_path / "eval" / "metrics.json").is_file()
    assert (tmp_path / "eval" / ".hydra" / "eval_source.yaml").is_file()


def test_eval_missing_inputs(trained_run, tmp_path):
    cfg = compose_eval([], tmp_path / "eval")
    with pytest.raises(ConfigError, match="ckpt_path is required"):
        evaluate(cfg)
    cfg = compose_eval(["ckpt_path=/no/such.ckpt"], tmp_path / "eval")
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        evaluate(cfg)
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    cfg = compose_eval([f"ckpt_path={ckpt}", "run_config=/no/config.yaml"], tmp_path / "eval")
    with pytest.raises(FileNotFoundError, match="run_config='/no/config.yaml': no such file"):
        evaluate(cfg)


@pytest.mark.parametrize("kind", ["garbage", "truncated", "not_lightning"])
def test_eval_corrupt_checkpoint(trained_run, tmp_path, kind):
    bad = trained_run / "checkpoints" / f"{kind}.ckpt"
    if kind == "garbage":
        bad.write_bytes(b"\x00not a checkpoint\xff" * 10)
    elif kind == "truncated":
        data = (trained_run / "checkpoints" / "last.ckpt").read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    else:
        torch.save({"weights": torch.zeros(2)}, bad)
    cfg = compose_eval([f"ckpt_path={bad}"], tmp_path / "eval")
    expected = (
        "not a PyTorch Lightning checkpoint"
        if kind == "not_lightning"
        else ("cannot read the checkpoint.*corrupt, truncated")
    )
    with pytest.raises(CheckpointError, match=expected):
        evaluate(cfg)
    assert not (tmp_path / "eval" / "metrics.json").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.body.hidden_sizes=[8,8]"], r"different shapes: \['model.body"),
        (["model=lstm_block"], "missing from the checkpoint"),
        (
            ["algorithm=maml", "algorithm.inner_lr_learned=per_tensor"],
            "missing from the checkpoint",
        ),
    ],
    ids=["shapes", "model", "learned-lr"],
)
def test_eval_checkpoint_of_another_model(trained_run, tmp_path, overrides, message):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    cfg = compose_eval([f"ckpt_path={ckpt}", *overrides], tmp_path / "eval")
    with pytest.raises(CheckpointError, match=message) as exc:
        evaluate(cfg)
    text = str(exc.value)
    assert "does not fit the model" in text and "the checkpoint:" in text
    assert "this config: task=sine" in text
    assert not (tmp_path / "eval" / "metrics.json").exists()


# ---------------------------------------------------------------------- the old config shape
def _old_shape(config: DictConfig) -> dict:
    """``config`` as a run wrote it before the engine group: the engine and its options
    were algorithm keys."""
    old = OmegaConf.to_container(config, resolve=False)
    engine = old.pop("engine")
    old["algorithm"].update(
        inner_loop=engine["name"],
        inner_optimizer={"name": "sgd"},
        vmap_chunk_size=engine.get("chunk_size"),
        compile=engine.get("compile", False),
    )
    return old


def test_eval_of_a_run_saved_in_the_old_shape(trained_run, tmp_path):
    """A run dir whose .hydra/config.yaml predates the engine group still evaluates."""
    old_dir = tmp_path / "old_run"
    shutil.copytree(trained_run, old_dir)
    config = old_dir / ".hydra" / "config.yaml"
    config.write_text(OmegaConf.to_yaml(_old_shape(OmegaConf.load(config))))
    ckpt = old_dir / "checkpoints" / "last.ckpt"
    cfg = compose_eval([f"ckpt_path={ckpt}", "task.num_test_tasks=4"], tmp_path / "eval")
    eff, *_ = build_eval_config(cfg)
    assert eff.engine.name == "functional" and "inner_loop" not in eff.algorithm
    metrics = evaluate(cfg)
    assert "test/mse_step_10" in metrics


def test_an_old_key_left_in_a_config_names_the_new_one(make_cfg):
    cfg = make_cfg(["+algorithm.vmap_chunk_size=4"])
    with pytest.raises(ConfigError, match=r"^algorithm.vmap_chunk_size=4: moved; use engine"):
        train(cfg)


@pytest.mark.parametrize(
    ("module", "override", "line"),
    [
        (
            "reptile_gen.train",
            "algorithm.inner_loop=lowrank",
            "error: algorithm.inner_loop=lowrank: moved; use engine=lowrank",
        ),
        (
            "reptile_gen.eval",
            "algorithm.inner_optimizer.name=adam",
            "error: algorithm.inner_optimizer.name=adam: moved; use engine=higher "
            "engine.inner_optimizer.name=adam",
        ),
    ],
)
def test_an_old_override_on_the_command_line_is_one_line(tmp_path, module, override, line):
    env = dict(os.environ, WANDB_MODE="offline", PROJECT_ROOT=str(tmp_path))
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(
        [sys.executable, "-m", module, override],
        cwd=Path(CONF_DIR).parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == line
