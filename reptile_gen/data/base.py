"""What every task DataModule shares: an endless seeded training stream sharded across
ranks, and fixed held-out validation and test sets."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from reptile_gen.data.streams import TaskStream
from reptile_gen.data.task_batch import TaskBatch

__all__ = ["TaskDataModule", "check_count"]


class TaskDataModule(pl.LightningDataModule):
    """Base of the task DataModules.

    Subclasses set ``self.spec`` (a :class:`~reptile_gen.data.TaskSpec`), ``self.seed``
    and ``self.meta_batch_size``, implement :meth:`sample` and build ``self.val_set`` and
    ``self.test_set`` (:class:`FixedTaskBatches`) in ``setup``.

    The training stream yields meta-batch ``i`` from a generator seeded by
    ``(seed, i, rank)``: it starts at the trainer's global step, so a resumed run draws
    the tasks it would have drawn, and ranks draw disjoint batches.
    """

    spec = None
    seed = 0

    def sample(self, generator: torch.Generator, num_tasks: int | None = None) -> TaskBatch:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        stream = TaskStream(
            self.sample,
            self.seed,
            start_step=trainer.global_step if trainer else 0,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
        )
        return DataLoader(stream, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=None)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=None)

    def metrics_extra(self) -> dict:
        """Provenance recorded in ``metrics.json`` (e.g. a corpus hash)."""
        return {}


def check_count(name: str, value, minimum: int = 1) -> int:
    """``value`` if it is an integer >= ``minimum``, else a clear error naming ``task.name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"task.{name}={value!r}; must be an integer >= {minimum}")
    return value
