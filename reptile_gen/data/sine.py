"""K-shot sine-wave regression (Finn et al., 2017): ``y = A sin(x - phase)``."""

from __future__ import annotations

import math

import torch

from reptile_gen.data.base import TaskDataModule, check_count
from reptile_gen.data.streams import FixedTaskBatches
from reptile_gen.data.task_batch import TaskBatch
from reptile_gen.data.task_spec import TaskSpec

__all__ = ["SineDataModule"]


def _range(name: str, value) -> tuple[float, float]:
    allowed = "allowed: a pair of numbers [low, high] with low < high"
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"task.{name}={_show(value)}: not a pair of numbers; {allowed}") from None
    if not low < high:
        raise ValueError(f"task.{name}={[low, high]}: low is not below high; {allowed}")
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"task.{name}={[low, high]}: not finite; {allowed}")
    return low, high


def _show(value) -> str:
    """``value`` as the command line writes it (a ``ListConfig`` as a plain list)."""
    try:
        return repr(list(value)) if not isinstance(value, (str, bytes)) else repr(value)
    except TypeError:
        return repr(value)


class SineDataModule(TaskDataModule):
    """Sine-wave tasks: amplitude ``A ~ U[amplitude_range]``, phase ``~ U[phase_range]``,
    inputs ``x ~ U[x_range]``; ``num_support`` (K) support and ``num_query`` query points.

    Args:
        num_support: K, the support points per task (>= 1).
        num_query: query points per task (scored after adaptation).
        meta_batch_size: tasks per meta-step.
        amplitude_range, phase_range, x_range: the task distribution (MAML's defaults:
            [0.1, 5], [0, pi], [-5, 5]).
        support_x_range: draw the support from this sub-range instead (extrapolation, e.g.
            [0, 5]); the query still covers ``x_range``.
        num_val_tasks, num_test_tasks: sizes of the fixed held-out sets.
        eval_batch_size: tasks per validation/test batch.
        seed: seed of the training stream.
        val_seed, test_seed: seeds of the held-out sets (fixed across runs, so every run
            is scored on the same tasks).
    """

    def __init__(
        self,
        num_support: int = 10,
        num_query: int = 100,
        meta_batch_size: int = 25,
        amplitude_range=(0.1, 5.0),
        phase_range=(0.0, math.pi),
        x_range=(-5.0, 5.0),
        support_x_range=None,
        num_val_tasks: int = 100,
        num_test_tasks: int = 600,
        eval_batch_size: int = 100,
        seed: int = 0,
        val_seed: int = 1,
        test_seed: int = 2,
    ) -> None:
        super().__init__()
        self.num_support = check_count("num_support", num_support)
        self.num_query = check_count("num_query", num_query)
        self.meta_batch_size = check_count("meta_batch_size", meta_batch_size)
        self.amplitude_range = _range("amplitude_range", amplitude_range)
        self.phase_range = _range("phase_range", phase_range)
        self.x_range = _range("x_range", x_range)
        self.support_x_range = (
            None if support_x_range is None else _range("support_x_range", support_x_range)
        )
        if self.support_x_range is not None and not (
            self.x_range[0] <= self.support_x_range[0]
            and self.support_x_range[1] <= self.x_range[1]
        ):
            raise ValueError(
                f"task.support_x_range={list(self.support_x_range)}: not inside "
                f"task.x_range={list(self.x_range)}; allowed: a sub-range of task.x_range, "
                "or null (the whole range)"
            )
        self.num_val_tasks = check_count("num_val_tasks", num_val_tasks)
        self.num_test_tasks = check_count("num_test_tasks", num_test_tasks)
        self.eval_batch_size = check_count("eval_batch_size", eval_batch_size)
        self.seed, self.val_seed, self.test_seed = seed, val_seed, test_seed
        self.spec = TaskSpec(
            "continuous", "real", input_dim=1, output_dim=1, name="sine", kind="sine"
        )

    # ------------------------------------------------------------------ sampling
    @staticmethod
    def _uniform(generator, shape, bounds) -> torch.Tensor:
        low, high = bounds
        return low + (high - low) * torch.rand(shape, generator=generator)

    def sample(self, generator: torch.Generator, num_tasks: int | None = None) -> TaskBatch:
        """Draw ``num_tasks`` (default: the meta-batch size) sine tasks."""
        n = num_tasks or self.meta_batch_size
        amplitude = self._uniform(generator, (n, 1, 1), self.amplitude_range)
        phase = self._uniform(generator, (n, 1, 1), self.phase_range)
        support_x = self._uniform(
            generator, (n, self.num_support, 1), self.support_x_range or self.x_range
        )
        query_x = self._uniform(generator, (n, self.num_query, 1), self.x_range)
        return TaskBatch(
            support_x=support_x,
            support_y=amplitude * torch.sin(support_x - phase),
            query_x=query_x,
            query_y=amplitude * torch.sin(query_x - phase),
            info=torch.cat([amplitude, phase], dim=-1).reshape(n, 2),
        )

    # ------------------------------------------------------------------ loaders
    def setup(self, stage: str | None = None) -> None:
        if not hasattr(self, "val_set"):
            self.val_set = FixedTaskBatches.build(
                self.sample, self.num_val_tasks, self.eval_batch_size, self.val_seed
            )
            self.test_set = FixedTaskBatches.build(
                self.sample, self.num_test_tasks, self.eval_batch_size, self.test_seed
            )
