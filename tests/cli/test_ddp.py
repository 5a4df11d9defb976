"""DDP on CPU: two gloo processes against one process on the same tasks.

* The meta-gradient (MAML, Reptile; both engines; checkpointed MAML) of a 2-process run
  whose ranks draw B tasks each equals the single-process meta-gradient on those 2B
  tasks (float64). The two processes are started once (torch.multiprocessing, the env
  variables torchrun would set; forked, for speed) and run a real Lightning ``Trainer`` built from
  ``trainer=ddp_cpu`` for every case; they write what they saw, and this process checks.
* The ranks' task streams are disjoint; the held-out sets are split without repeats.
* Test metrics of the 2-process test equal those of a single-process test with the same
  weights, on a test set whose batches do not split evenly over the ranks.
* The command line ``trainer=ddp_cpu debug=fast`` writes one metrics.json, the plots and
  the checkpoints, and no per-rank files.
"""

from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.multiprocessing as mp
from conftest import compose_config
from omegaconf import OmegaConf, open_dict
from test_cli import check, run_cli

from reptile_gen.data.streams import TaskStream, shard_range, step_generator
from reptile_gen.data.task_batch import TaskBatch
from reptile_gen.utils.instantiate import build_run

WORLD = 2
#: tasks per rank and meta-step (task.meta_batch_size is per rank)
PER_RANK = 3
#: 3 test batches of 4 tasks: ranks get 2 and 1 (Lightning's sampler would repeat one)
TEST_OVERRIDES = ["task.num_test_tasks=12", "task.eval_batch_size=4"]
TINY_DDP = [
    "trainer=ddp_cpu",
    "trainer.strategy.start_method=popen",  # the processes already exist (see _worker)
    "trainer.precision=64-true",
    "trainer.max_steps=1",
    "trainer.limit_val_batches=0",
    "model.body.hidden_sizes=[8,8]",
    "model.body.activation=tanh",
    "model.embedding_dim=8",
    f"task.meta_batch_size={PER_RANK}",
    "task.num_support=5",
    "task.num_query=6",
    "algorithm.eval_inner_steps=3",
    *TEST_OVERRIDES,
]
CASES = {
    "maml": ["algorithm=maml", "algorithm.inner_steps=2"],
    "reptile": ["algorithm=reptile", "algorithm.inner_steps=3", "algorithm.scheduler=null"],
    "maml_higher": ["algorithm=maml", "algorithm.inner_steps=2", "engine=higher"],
    "reptile_higher": [
        "algorithm=reptile",
        "algorithm.inner_steps=3",
        "algorithm.scheduler=null",
        "engine=higher",
    ],
    "maml_checkpointed": [
        "algorithm=maml",
        "algorithm.inner_steps=4",
        "algorithm.checkpoint_segments=2",
    ],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _double(batch: TaskBatch) -> TaskBatch:
    return batch.map(lambda t: t.double() if t.is_floating_point() else t)


def _worker(rank: int, port: int, cfgs: dict, out_dir: str) -> None:
    """One rank: fit one meta-step and test, for every case, in this process."""
    import os

    import hydra
    import pytorch_lightning as pl

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(WORLD),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    torch.set_num_threads(1)

    class Capture(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.batch = batch

        def on_before_optimizer_step(self, trainer, module, optimizer):
            self.grads = {n: p.grad.detach().clone() for n, p in module.named_parameters()}

    for name, cfg in cfgs.items():
        datamodule, module = build_run(cfg)
        capture = Capture()
        trainer = hydra.utils.instantiate(
            cfg.trainer,
            callbacks=[capture],
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
        )
        trainer.fit(module, datamodule=datamodule)
        train_loss = float(trainer.callback_metrics["train/meta_loss"])
        trainer.test(module, datamodule=datamodule, verbose=False)
        test_metrics = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")
        }
        torch.save(
            {
                "batch": capture.batch,
                "grads": capture.grads,
                "train_loss": train_loss,
                "test_metrics": test_metrics,
                "num_test_batches": trainer.num_test_batches,
                "state_dict": module.state_dict(),
            },
            f"{out_dir}/{name}_rank{rank}.pt",
        )


def _config(overrides: list[str], out) -> OmegaConf:
    cfg = compose_config(overrides, out)
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.resolve(cfg)  # the workers have no Hydra app to resolve ${hydra:...}
    return cfg


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """``{case: (cfg, [rank 0 record, rank 1 record])}`` of one 2-process launch."""
    out = tmp_path_factory.mktemp("ddp")
    cfgs = {name: _config(TINY_DDP + extra, out / name) for name, extra in CASES.items()}
    # fork: the workers start with this process's imports (spawning costs each worker a
    # fresh interpreter and ~10 s of imports); the ddp_spawn path itself is run by the
    # command-line test below
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(
        _worker, args=(_free_port(), cfgs, str(out)), nprocs=WORLD, start_method=method
    )
    return {
        name: (
            cfg,
            [torch.load(out / f"{name}_rank{r}.pt", weights_only=False) for r in range(WORLD)],
        )
        for name, cfg in cfgs.items()
    }


def _rank_batches(cfg, datamodule) -> list[TaskBatch]:
    """The tasks each rank draws at meta-step 0 (the real stream, rank and world size)."""
    return [
        _double(next(iter(TaskStream(datamodule.sample, cfg.seed, 0, rank, WORLD))))
        for rank in range(WORLD)
    ]


def _cat(batches: list[TaskBatch]) -> TaskBatch:
    first = batches[0]
    return TaskBatch(
        **{
            k: None if getattr(first, k) is None else torch.cat([getattr(b, k) for b in batches])
            for k in first.__dataclass_fields__
        }
    )


def _meta_grads(module, batch: TaskBatch) -> tuple[float, dict[str, torch.Tensor]]:
    module.zero_grad()
    loss, _ = module.meta_loss(batch)
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("case", list(CASES))
def test_ddp_meta_gradient_equals_single_process_on_all_tasks(ddp_runs, case):
    cfg, records = ddp_runs[case]
    datamodule, module = build_run(cfg)  # same seed: the ranks' initial weights
    shards = _rank_batches(cfg, datamodule)
    for rank, record in enumerate(records):
        seen = _double(record["batch"])
        assert seen.num_tasks == PER_RANK
        torch.testing.assert_close(seen.support_x, shards[rank].support_x, rtol=0, atol=0)
        torch.testing.assert_close(seen.query_y, shards[rank].query_y, rtol=0, atol=0)
    full_loss, full = _meta_grads(module, _cat(shards))
    for record in records:
        assert record["grads"].keys() == full.keys()
        for key, grad in full.items():
            torch.testing.assert_close(record["grads"][key], grad, rtol=1e-10, atol=1e-12)
    # the averaging is real: rank 0's tasks alone give another meta-gradient
    _, alone = _meta_grads(module, shards[0])
    assert any(not torch.allclose(alone[k], full[k]) for k in full)
    # train/meta_loss is synced: the mean over ranks of the ranks' meta-losses
    per_rank = [_meta_grads(module, shard)[0] for shard in shards]
    for record in records:
        assert record["train_loss"] == pytest.approx(sum(per_rank) / WORLD, rel=1e-12)
    if case.startswith("maml"):  # a mean over tasks: the same as the full batch's
        assert records[0]["train_loss"] == pytest.approx(full_loss, rel=1e-12)


@pytest.mark.parametrize("case", ["maml", "reptile_higher"])
def test_ddp_test_metrics_equal_single_process(ddp_runs, case, tmp_path):
    """3 test batches over 2 ranks (2 + 1): gathered, each task counted once, the metrics
    are exactly those of one process on the same 12 tasks with the same weights."""
    import hydra

    cfg, records = ddp_runs[case]
    assert [r["num_test_batches"] for r in records] == [[2], [1]]
    assert records[0]["test_metrics"] == records[1]["test_metrics"]
    single = _config(
        [
            "trainer.precision=64-true",
            "model.body.hidden_sizes=[8,8]",
            "model.body.activation=tanh",
            "model.embedding_dim=8",
            "task.num_support=5",
            "task.num_query=6",
            "algorithm.eval_inner_steps=3",
            *CASES[case],
            *TEST_OVERRIDES,
        ],
        tmp_path,
    )
    datamodule, module = build_run(single)
    module.load_state_dict(records[0]["state_dict"])
    trainer = hydra.utils.instantiate(
        single.trainer, logger=False, enable_checkpointing=False, enable_model_summary=False
    )
    trainer.test(module, datamodule=datamodule, verbose=False)
    expected = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    assert "test/mse_step_3" in expected and "test/random_init/mse_step_0" in expected
    assert records[0]["test_metrics"] == expected


def test_held_out_shards_cover_every_batch_once():
    for num in range(0, 9):
        for world in range(1, 5):
            shares = [list(shard_range(num, r, world)) for r in range(world)]
            assert sum(shares, []) == list(range(num))  # contiguous, in rank order
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError, match="rank=2"):
        shard_range(4, 2, 2)


def test_training_streams_of_ranks_are_disjoint(make_cfg):
    """World size W over N steps uses meta-batch indices 0..N*W-1, each once, and the
    ranks' sine tasks (amplitude, phase) never repeat across ranks or steps."""
    for world in (1, 2, 3, 4):
        seeds = [
            step_generator(0, step, rank, world).initial_seed()
            for step in range(6)
            for rank in range(world)
        ]
        assert len(set(seeds)) == len(seeds)
        assert set(seeds) == {step_generator(0, i).initial_seed() for i in range(6 * world)}
    datamodule, _ = build_run(make_cfg(["task.meta_batch_size=5"]))
    tasks = []
    for rank in range(WORLD):
        stream = iter(TaskStream(datamodule.sample, 0, 0, rank, WORLD))
        tasks += [next(stream).info for _ in range(4)]
    tasks = torch.cat(tasks)
    assert tasks.shape == (WORLD * 4 * 5, 2)
    assert torch.unique(tasks, dim=0).shape[0] == tasks.shape[0]


def test_cli_ddp_cpu_writes_files_once(tmp_path):
    """``python -m reptile_gen.train trainer=ddp_cpu debug=fast``: two spawned ranks; the
    run dir holds exactly one metrics.json (with the gathered metrics of all 12 test
    tasks), the plots, the checkpoints, and nothing per rank."""
    run_dir = tmp_path / "run"
    proc = check(
        run_cli(
            [
                "-m",
                "reptile_gen.train",
                "trainer=ddp_cpu",
                "debug=fast",
                "logger=csv",
                "trainer.enable_progress_bar=false",
                "algorithm.eval_inner_steps=3",
                "model.body.hidden_sizes=[8,8]",
                *TEST_OVERRIDES,
                f"hydra.run.dir={run_dir}",
            ],
            tmp_path,
        )
    )
    assert "Starting with 2 processes" in proc.stdout + proc.stderr
    files = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
    assert files.count("metrics.json") == 1
    assert [f for f in files if f.endswith("metrics.json")] == ["metrics.json"]
    for name in ("learning_curve.png", "fit.png", "checkpoints/last.ckpt", "train.log"):
        assert name in files, files
    assert [f for f in files if f.startswith("csv/")] == [
        "csv/version_0/hparams.yaml",
        "csv/version_0/metrics.csv",
    ]
    assert not [f for f in files if "rank" in f or "ddp_process" in f or "temp" in f], files
    checkpoints = [f for f in files if f.startswith("checkpoints/")]
    assert len(checkpoints) == 2, checkpoints  # the best on val/loss and last.ckpt
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"test/mse_step_3", "test/random_init/mse_step_3", "fit_seconds"} <= set(metrics)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4


@pytest.mark.parametrize(
    "strategy",
    [None, "trainer.strategy=ddp", "trainer.strategy.start_method=popen"],
)
def test_ddp_relaunching_the_command_line_in_a_local_sweep_is_a_config_error(strategy, tmp_path):
    """``trainer=ddp`` (popen) re-runs the command line per rank: inside ``-m`` with the
    basic launcher that is the whole sweep again, so it is refused before anything runs;
    spawned ranks (``ddp_cpu``) are fine in a sweep, and popen is fine in a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from reptile_gen.utils.runtime import ConfigError, check_config

    overrides = ["trainer=ddp_cpu"] + ([strategy] if strategy else [])
    cfg = compose_config(overrides, tmp_path)
    check_config(cfg)  # a single run: fine
    OmegaConf.set_readonly(cfg.hydra, False)
    cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig.instance().set_config(cfg)
    try:
        if strategy is None:
            check_config(cfg)  # spawned ranks in a sweep: fine
        else:
            with pytest.raises(ConfigError, match=r"strategy=.*multirun.*start_method=spawn"):
                check_config(cfg)
    finally:  # later tests in this process must not see a multirun
        OmegaConf.set_readonly(cfg.hydra, False)
        cfg.hydra.mode = RunMode.RUN
        HydraConfig.instance().set_config(cfg)


def test_split_for_ranks_gives_every_rank_tasks_in_order():
    from reptile_gen.data.base import split_for_ranks

    batch = TaskBatch(support_x=torch.arange(5.0).reshape(5, 1, 1), support_y=torch.zeros(5, 1, 1))
    pieces = split_for_ranks([batch], 2)
    assert [p.num_tasks for p in pieces] == [3, 2]
    assert torch.cat([p.support_x for p in pieces]).reshape(-1).tolist() == [0, 1, 2, 3, 4]
    assert split_for_ranks([batch, batch], 2) == [batch, batch]
    with pytest.raises(ValueError, match="trainer.devices=8"):
        split_for_ranks([batch], 8)


@pytest.mark.parametrize(
    "task",
    [
        ["task=sine", "task.num_val_tasks=6", "task.num_test_tasks=6"],
        ["experiment=text_quick", "task.num_val_tasks=4", "task.num_test_tasks=4"],
        ["experiment=digits_maml", "task.num_val_tasks=4", "task.num_test_tasks=4"],
    ],
    ids=["sine", "text", "digits"],
)
def test_cli_ddp_cpu_with_the_tasks_eval_batches(task, tmp_path):
    """``trainer=ddp_cpu`` with each task's own ``eval_batch_size`` (not debug=fast): the
    held-out sets fit in one batch, which is cut so that no rank's loader is empty."""
    run_dir = tmp_path / "run"
    check(
        run_cli(
            [
                "-m",
                "reptile_gen.train",
                *task,
                "trainer=ddp_cpu",
                "trainer.max_steps=2",
                "trainer.val_check_interval=2",
                "trainer.enable_progress_bar=false",
                "algorithm.eval_inner_steps=2",
                f"hydra.run.dir={run_dir}",
            ],
            tmp_path,
            timeout=500,
        )
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert any(k.startswith("test/") for k in metrics), metrics


def test_cli_ddp_cpu_with_validations_and_the_default_test_set_finishes(tmp_path):
    """The sine defaults with a few validations before the test: rank zero's gathered
    evaluation curves are too large for the results pipe that Lightning joins before
    reading, so they travel through a file (this run used to hang after its test)."""
    run_dir = tmp_path / "run"
    check(
        run_cli(
            [
                "-m",
                "reptile_gen.train",
                "trainer=ddp_cpu",
                "trainer.max_steps=60",
                "trainer.val_check_interval=20",
                "trainer.enable_progress_bar=false",
                f"hydra.run.dir={run_dir}",
            ],
            tmp_path,
        )
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "test/mse_step_10" in metrics and (run_dir / "learning_curve.png").is_file()
