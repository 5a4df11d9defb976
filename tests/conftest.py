"""Shared fixtures: compose the real configs with Hydra's compose API, shrunk for tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
REPO_ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("WANDB_MODE", "offline")
# tiny networks: one thread is as fast, and does not fight other processes for the cores
torch.set_num_threads(1)

#: overrides that make any run tiny (a few meta-steps, a few held-out tasks, no logger)
TINY = [
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "task.num_val_tasks=4",
    "task.num_test_tasks=4",
    "task.eval_batch_size=4",
    "task.meta_batch_size=4",
    "logger=none",
]


def compose_config(overrides: list[str], output_dir: Path | str, tiny: bool = True) -> DictConfig:
    """Compose ``conf/config.yaml`` with ``overrides`` (plus :data:`TINY`) as the CLI would,
    with the run dir set to ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=(TINY if tiny else []) + list(overrides),
            return_hydra_config=True,
        )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.hydra.runtime.output_dir = str(output_dir)
    # resolve ${hydra:...} interpolations outside a running app
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, restored after it: tiny vmapped ops only pay
    for a second thread's synchronisation, and in-process runs may change the count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_cfg(tmp_path):
    """``make_cfg(overrides, tiny=True)`` -> a composed config whose run dir is in tmp."""

    def _make(overrides=(), tiny: bool = True, name: str = "run") -> DictConfig:
        return compose_config(list(overrides), tmp_path / name, tiny=tiny)

    return _make
