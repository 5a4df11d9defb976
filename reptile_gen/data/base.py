"""What every task DataModule shares: an endless seeded training stream sharded across
ranks, and fixed held-out validation and test sets split across ranks."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from reptile_gen.data.streams import TaskStream, shard_range
from reptile_gen.data.task_batch import TaskBatch

__all__ = ["TaskDataModule", "HeldOutShard", "check_count", "check_flag"]


class TaskDataModule(pl.LightningDataModule):
    """Base of the task DataModules.

    Subclasses set ``self.spec`` (a :class:`~reptile_gen.data.TaskSpec`), ``self.seed``
    and ``self.meta_batch_size``, implement :meth:`sample` and build ``self.val_set`` and
    ``self.test_set`` (:class:`FixedTaskBatches`) in ``setup``.

    The training stream yields meta-batch ``i`` from a generator seeded by
    ``(seed, i, rank)``: it starts at the trainer's global step, so a resumed run draws
    the tasks it would have drawn, and ranks draw disjoint batches.

    Under DDP the held-out sets are split by batches into contiguous shares, one per
    rank (:class:`HeldOutShard`): each task is scored exactly once, and the algorithm
    gathers the per-task results so every rank computes the metrics on the whole set.
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
        return self._held_out_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._held_out_loader(self.test_set)

    def _held_out_loader(self, batches: Dataset) -> DataLoader:
        trainer = self.trainer
        world_size = trainer.world_size if trainer else 1
        if world_size == 1:
            return DataLoader(batches, batch_size=None)
        batches = split_for_ranks(batches, world_size)
        sampler = HeldOutShard(batches, trainer.global_rank, world_size)
        return DataLoader(batches, batch_size=None, sampler=sampler)

    def metrics_extra(self) -> dict:
        """Provenance recorded in ``metrics.json`` (e.g. a corpus hash)."""
        return {}


def split_for_ranks(batches: Dataset, world_size: int) -> Dataset:
    """``batches`` with each batch cut into contiguous task slices when there are fewer
    batches than ranks, so that every rank gets a share (Lightning refuses an empty
    validation or test loader on one rank); the tasks and their order are unchanged."""
    if len(batches) >= world_size:
        return batches
    parts = -(-world_size // max(len(batches), 1))
    pieces = []
    for batch in (batches[i] for i in range(len(batches))):
        for share in (shard_range(batch.num_tasks, k, parts) for k in range(parts)):
            if len(share):
                pieces.append(batch[share.start : share.stop])
    if len(pieces) < world_size:
        raise ValueError(
            f"trainer.devices={world_size}: the held-out set has only {len(pieces)} tasks, "
            "fewer than the ranks; allowed: task.num_val_tasks and task.num_test_tasks >= "
            "the number of ranks"
        )
    return pieces


class HeldOutShard(DistributedSampler):
    """Rank ``rank``'s contiguous share of a held-out set's batches (see
    :func:`~reptile_gen.data.streams.shard_range`).

    Lightning's own ``DistributedSampler`` pads the shares to equal length by repeating
    batches, which would count those tasks twice in the test metrics; a sampler that is
    a ``DistributedSampler`` is left in place by Lightning. A rank may get fewer batches
    (or none): evaluation runs no collective per batch, and the gather at the end of the
    epoch handles unequal shares.
    """

    def __init__(self, dataset: Dataset, rank: int, world_size: int) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        self.indices = shard_range(len(dataset), rank, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def check_count(name: str, value, minimum: int = 1) -> int:
    """``value`` if it is an integer >= ``minimum``, else a clear error naming ``task.name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"task.{name}={value!r}; must be an integer >= {minimum}")
    return value


def check_flag(name: str, value) -> bool:
    """``value`` if it is a boolean, else a clear error naming ``task.name``."""
    if not isinstance(value, bool):
        raise ValueError(f"task.{name}={value!r}; allowed: true, false")
    return value
