"""The exact low-rank engine (``engine=lowrank``).

One inner SGD step changes a linear layer's weight by ``-alpha * sum_i delta_i a_i^T``
(``a_i``: the layer's input for element ``i`` of the step, ``delta_i``: the loss gradient
at its output), a matrix of rank at most the step's element count. After ``t`` steps

    W_t x = W_0 x - alpha * sum_{s < t} delta_s (a_s . x),

so a task never needs its own copy of ``W``: the engine keeps the initial weights shared by
every task of the meta-batch (one matmul for all of them) and, per task and per layer, the
*history* of rows ``(a_s, delta_s)``. An ``nn.Embedding`` is the same with one-hot inputs:
the history keeps the looked-up indices and their output gradients, and the correction of a
lookup of row ``i`` sums the ``delta_s`` of earlier lookups of ``i``. Every other parameter
(biases, LayerNorm gains, the LSTM block's ``h0``/``c0``, linear layers whose weight is tied
or that are not plain ``nn.Linear``) stays a per-task tensor updated by ordinary SGD.

How it runs: the model is called per task under ``vmap`` with ``functional_call`` and the
initial weights; a forward hook on each low-rank layer subtracts its history's correction
and adds a zero *probe* to its output. ``torch.func.grad`` with respect to the probes gives
the ``delta`` rows (the hook records the layer inputs ``a`` as auxiliary outputs). The
updates are hand-batched over tasks outside ``vmap``. Results equal the functional engine's
(losses, adapted weights, meta-gradients): tested in float64 on every model body.

Modes (``grad_mode``):

* ``none`` (Reptile, evaluation): no graph; the history lives in preallocated buffers
  written in place, and the task-mean of the adapted weights (what Reptile needs) is one
  GEMM per layer over all tasks' history rows (``return_adapted="mean"``).
* ``first_order``: the history is made of constants (the inner gradients are detached),
  so it stays in the buffers; the losses keep their graph to the initial parameters and
  learned rates.
* ``second_order``: history rows carry the graph. Without checkpointing they are kept as a
  concatenated prefix plus a short list of recent rows (re-concatenated every ~sqrt(T)
  steps, so memory grows as T^1.5 rather than T^2). With ``checkpoint_segments`` the loop
  runs without a graph into the buffers, and backward recomputes one segment at a time from
  the saved small parameters and the history prefix (a slice of the final buffers), passing
  gradients of history rows back to the segments that wrote them: memory is one history
  plus its gradient plus one segment's graph. ``truncate_steps=k`` treats all but the last
  ``k`` updates as first-order, as in the functional engine.

Idle steps: a step whose elements are all padding for a task is a no-op for it (zero
loss, zero gradient). The engine sorts the tasks by their last step with a real element
(results come back in the caller's order), so the tasks still active at a step are a
prefix of the batch, and every step (with or without a graph) runs on that prefix only;
the idle tasks get zero history rows (written only where a reader needs them).

Rates that change along the loop (``inner_lr_schedule``, ``inner_lr_learned=per_step|
per_layer_per_step``): the rate of step ``s`` multiplies that step's rows ``delta_s`` when
they are written, so ``W_t x = W_0 x - sum_{s < t} (r_s delta_s) (a_s . x)`` and every
reader of the history sums rows that carry their rate. A schedule's factor is a constant
(the base rate, fixed or learned, still multiplies the correction); a learned per-step
rate is in the rows with its graph, so a first-order run keeps those rows (constants
times a rate) with a graph rather than in the buffers, and the checkpointed backward gets
the rates' gradients from the recomputed rows like the weights' (see ``state.Env``).

Per-unit rates (``inner_lr_learned=per_unit``: one rate per output unit, a weight
``(out, in)`` has ``(out, 1)``) scale the output side of each rank-one update,
``r * delta_s``: they go into the rows as a per-step rate does (an embedding table's rate
is per table row: a row takes the rate of the row it looked up).

Limits (clear errors): plain SGD only (no ``inner_momentum``: a velocity is a dense
per-task tensor, which this engine exists to avoid); learned inner rates ``scalar``,
``per_tensor``, ``per_unit``, ``per_step`` or ``per_layer_per_step`` (a ``per_parameter``
rate matrix does not factor out of the sum); each low-rank layer must run once per
forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from reptile_gen.inner_loop.core import (
    InnerLoopEngine,
    InnerLoopResult,
    LossFn,
    check_truncate_steps,
    last_active_step,
    num_segments,
)
from reptile_gen.inner_loop.lowrank.run import Run
from reptile_gen.inner_loop.lowrank.sites import FOLDS

if TYPE_CHECKING:
    from reptile_gen.data.task_batch import TaskBatch
    from reptile_gen.inner_loop.core import InnerLR, InnerSchedule

__all__ = ["LowRankEngine", "LOWRANK_LR_MODES"]

#: learned inner learning rates the low-rank form can carry (one rate per weight tensor,
#: per weight tensor and step, or per output unit)
LOWRANK_LR_MODES = ("none", "scalar", "per_tensor", "per_step", "per_layer_per_step", "per_unit")


def _check_momentum(value) -> None:
    if value:
        raise ValueError(
            f"algorithm.inner_momentum={value} with engine=lowrank: the low-rank engine "
            "runs plain SGD (a velocity is a dense per-task copy of every weight, which its "
            "history of rows avoids); allowed: engine=functional|higher, or "
            "algorithm.inner_momentum=0"
        )


def _check_learned(value: str) -> None:
    if value not in LOWRANK_LR_MODES:
        raise ValueError(
            f"algorithm.inner_lr_learned={value!r} with engine=lowrank: a "
            "per-parameter rate matrix does not factor out of the low-rank update; allowed: "
            f"{', '.join(LOWRANK_LR_MODES)} (or engine=functional|higher)"
        )


class LowRankEngine(InnerLoopEngine):
    """Inner SGD with shared initial weights and per-task low-rank update histories.

    Args:
        chunk_size: tasks per pass of the inner loop (None: all at once); the passes run
            one after the other, bounding the history's memory.
        checkpoint_segments: second-order only: ``None`` (keep the graph), ``auto``
            (sqrt(T) segments recomputed in backward) or a segment count.
        truncate_steps: second-order only: differentiate through the last ``k`` inner
            updates (None: all).
        inner_lr_learned: the learned-rate mode the engine will be run with, checked when
            the engine is built (any but ``per_parameter``).
        inner_lr_schedule: the fixed rate schedule it will be run with (any: a step's
            factor multiplies its history rows).
        inner_momentum: the inner momentum it will be run with (0 only: an error else).
        fold: how a recomputed checkpoint segment reads the history before it: ``auto``
            (as rows or folded into a dense per-task weight delta, whichever reads less),
            ``always`` (folded) or ``never`` (rows); the same numbers.
        poison_history: fill the history buffers with NaN (indices out of range) when
            they are made: a check that no step reads a row before it is written.
        on_step: called with ``("general" | "fast", number of tasks)`` at every inner
            step (the general step or the hand-written MLP step), e.g. to count them.
    """

    name = "lowrank"

    def __init__(
        self,
        chunk_size: int | None = None,
        checkpoint_segments: int | str | None = None,
        truncate_steps: int | None = None,
        inner_lr_learned: str = "none",
        inner_lr_schedule="constant",
        inner_momentum: float = 0.0,
        fold: str = "auto",
        poison_history: bool = False,
        on_step: Callable[[str, int], None] | None = None,
    ) -> None:
        num_segments(checkpoint_segments, 1)  # validates
        check_truncate_steps(truncate_steps)
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"engine.chunk_size={chunk_size!r}; allowed: null or an integer >= 1")
        _check_learned(inner_lr_learned)
        _check_momentum(inner_momentum)
        if fold not in FOLDS:
            raise ValueError(
                f"engine.fold={fold!r}: how the low-rank engine reads its history; allowed: {', '.join(FOLDS)}"
            )
        self.fold = fold
        self.poison_history = poison_history
        self.on_step = on_step
        self.chunk_size = chunk_size
        self.checkpoint_segments = checkpoint_segments
        self.truncate_steps = truncate_steps

    @classmethod
    def from_options(cls, inner_optimizer, inner_optimizer_kwargs, options):
        cls.refuse_compile(cls.name, options)
        if inner_optimizer != "sgd" or inner_optimizer_kwargs:
            raise ValueError(
                f"engine.inner_optimizer={{name: {inner_optimizer}, {inner_optimizer_kwargs}}} "
                "with engine=lowrank: the low-rank engine runs plain SGD "
                "(inner_optimizer.name=sgd, no extra options); stateful inner optimizers "
                "need engine=higher"
            )
        options = {k: v for k, v in options.items() if k != "compile"}
        return cls(**options)

    def run(
        self,
        model: nn.Module,
        batch: TaskBatch,
        loss_fn: LossFn,
        lr: InnerLR,
        schedule: InnerSchedule,
        grad_mode: str,
        *,
        track_query: bool = False,
        return_adapted: bool | str = False,
    ) -> InnerLoopResult:
        _check_learned(lr.learned)
        _check_momentum(lr.momentum)
        if return_adapted not in (False, True, "mean"):
            raise ValueError(f"return_adapted={return_adapted!r}; allowed: False, True, 'mean'")
        # tasks sorted by their last step with a real element: the tasks still active at
        # a step are then a prefix of the batch, and the steps run on that prefix only
        order = _task_order(batch.support_mask, schedule)
        if order is not None:
            batch = batch[order]
        num_tasks = batch.num_tasks
        if self.chunk_size is None or num_tasks <= self.chunk_size:
            result = Run(self, model, batch, loss_fn, lr, schedule, grad_mode).result(
                track_query, return_adapted
            )
        else:
            parts = []
            for i in range(0, num_tasks, self.chunk_size):
                chunk = batch[i : i + self.chunk_size]
                run = Run(self, model, chunk, loss_fn, lr, schedule, grad_mode)
                parts.append(run.result(track_query, return_adapted))
            result = _concat_results(parts, num_tasks)
        return result if order is None else _reorder(result, torch.argsort(order))


def _task_order(mask: torch.Tensor, schedule: InnerSchedule) -> torch.Tensor | None:
    """Task order by last active step, descending (None: already in that order)."""
    last = last_active_step(mask, schedule.slices(mask.shape[1]))
    if last.numel() < 2 or bool((last[:-1] >= last[1:]).all()):
        return None
    return torch.argsort(last, descending=True, stable=True)


def _reorder(result: InnerLoopResult, index: torch.Tensor) -> InnerLoopResult:
    """``result`` with its per-task rows taken in ``index`` order."""

    def pick(t):
        return None if t is None else t[index]

    return InnerLoopResult(
        step_losses=pick(result.step_losses),
        element_losses=pick(result.element_losses),
        query_losses=pick(result.query_losses),
        adapted=None
        if result.adapted is None
        else {k: v[index] for k, v in result.adapted.items()},
        adapted_mean=result.adapted_mean,
    )


def _concat_results(parts: list[InnerLoopResult], num_tasks: int) -> InnerLoopResult:
    """One result from the results of consecutive task chunks."""

    def cat(field):
        values = [getattr(p, field) for p in parts]
        if values[0] is None:
            return None
        if isinstance(values[0], dict):
            return {k: torch.cat([v[k] for v in values]) for k in values[0]}
        return torch.cat(values)

    mean = None
    if parts[0].adapted_mean is not None:
        sizes = [p.step_losses.shape[0] for p in parts]
        mean = {
            k: sum(p.adapted_mean[k] * (n / num_tasks) for p, n in zip(parts, sizes))
            for k in parts[0].adapted_mean
        }
    return InnerLoopResult(
        step_losses=cat("step_losses"),
        element_losses=cat("element_losses"),
        query_losses=cat("query_losses"),
        adapted=cat("adapted"),
        adapted_mean=mean,
    )
