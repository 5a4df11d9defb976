"""Deterministic task streams: the training stream is a pure function of
(seed, meta-step, rank), so a resumed run sees exactly the tasks it would have seen."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import Dataset, IterableDataset

from reptile_gen.data.task_batch import TaskBatch

__all__ = ["TaskStream", "FixedTaskBatches", "step_generator", "shard_range"]

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads nearby seeds far apart


def step_generator(seed: int, step: int, rank: int = 0, world_size: int = 1) -> torch.Generator:
    """The random generator of one meta-step's tasks on one rank.

    Meta-batch ``step * world_size + rank`` of the seed: ranks of one step, and steps,
    never share an index, and steps ``0..N-1`` of ``world_size`` ranks use exactly
    indices ``0..N*world_size-1``.
    """
    index = step * world_size + rank
    return torch.Generator().manual_seed((seed * _MIX + index * 0x2545F491) % (2**63 - 1))


def shard_range(num_items: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s contiguous share of ``num_items`` (the first ``num_items %
    world_size`` ranks get one more): the shares cover every item once, with no
    padding, and concatenated in rank order they are ``range(num_items)``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
    base, extra = divmod(num_items, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


class TaskStream(IterableDataset):
    """An endless stream of meta-batches; item ``i`` is ``sample(step_generator(seed, i))``.

    Args:
        sample: draws one meta-batch from a ``torch.Generator``.
        seed: the training seed.
        start_step: the first meta-step to yield (set on resume).
        rank, world_size: this process's shard (ranks draw disjoint task batches).
    """

    def __init__(
        self,
        sample: Callable[[torch.Generator], TaskBatch],
        seed: int,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.sample = sample
        self.seed = seed
        self.start_step = start_step
        self.rank = rank
        self.world_size = world_size

    def __iter__(self):
        step = self.start_step
        while True:
            yield self.sample(step_generator(self.seed, step, self.rank, self.world_size))
            step += 1


class FixedTaskBatches(Dataset):
    """A fixed, seeded set of held-out tasks, served as meta-batches of ``batch_size``."""

    def __init__(self, batches: list[TaskBatch]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> TaskBatch:
        return self.batches[index]

    @classmethod
    def build(
        cls,
        sample: Callable[[torch.Generator, int], TaskBatch],
        num_tasks: int,
        batch_size: int,
        seed: int,
    ) -> FixedTaskBatches:
        generator = torch.Generator().manual_seed(seed)
        sizes = [min(batch_size, num_tasks - s) for s in range(0, num_tasks, batch_size)]
        return cls([sample(generator, n) for n in sizes])
