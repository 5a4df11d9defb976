"""The default engine: pure functions of per-task parameters, batched over the tasks.

How the tasks are batched is the engine's ``path`` (default ``auto``: the fastest that
covers the model; all give the same numbers, see :mod:`.runner`):

* ``analytic``: ``[B, ...]`` parameters, hand-batched forward and hand-written inner
  gradient (no double backward); chosen for models made of ``Linear``, elementwise
  activations, ``SineLayer`` and the input encoders (``mlp``, ``text_mlp``, ``siren``).
  With a closed-form loss, the meta-gradient through the inner loop is a hand-written
  reverse pass too (:mod:`.second_order`: Hessian-vector products by R-operators, no
  autograd graph; ``hand_backward=False`` keeps autograd's graph instead).
* ``autograd``: ``[B, ...]`` parameters, hand-batched forward, inner gradient from one
  ``torch.autograd.grad`` of the summed task losses; chosen for the other built-in
  bodies (``gated_mlp``, ``lstm_block`` with its LayerNorm).
* ``vmap``: as ``autograd`` with a ``vmap(functional_call)`` forward; chosen for any
  other model.
* ``vmap_grad``: the generic ``torch.func`` form, ``vmap`` over tasks of ``grad`` of a
  ``functional_call`` (the reference the others are tested against).

Steps past the longest sequence of a batch (padding in every task) are skipped: they
change nothing, and text batches padded to ``max_len`` = 128 hold ~47-byte lines.

Long sequences (784 MNIST steps) make the second-order unroll too big to keep: each step
holds a per-task copy of every parameter. Two remedies, chosen by config:

* **segment checkpointing** (``checkpoint_segments``): the steps are cut into segments
  (``auto``: about sqrt(T) of them). Forward keeps only each segment's input parameters;
  backward recomputes one segment with its graph and feeds the segment's output gradient
  in (the core's :class:`~reptile_gen.inner_loop.core.recompute.RecomputedSegment`).
  Gradients equal the full unroll's.
* **truncation** (``truncate_steps=k``): only the last ``k`` inner updates are
  differentiated through; older ones are treated as constants (first-order).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from reptile_gen.inner_loop.core import (
    InnerLoopEngine,
    InnerLoopResult,
    LossFn,
    check_truncate_steps,
    first_order_before,
    first_visit,
    num_segments,
    per_step_rates,
    segment_bounds,
    steps_with_data,
)
from reptile_gen.inner_loop.core.model_plan import compile_model
from reptile_gen.inner_loop.core.recompute import RecomputedSegment
from reptile_gen.inner_loop.functional import compiled, compiled_plan
from reptile_gen.inner_loop.functional.runner import BatchedRunner
from reptile_gen.inner_loop.functional.segments import SegmentRunner

if TYPE_CHECKING:
    from reptile_gen.data.task_batch import TaskBatch
    from reptile_gen.inner_loop.core import InnerLR, InnerSchedule

__all__ = ["FunctionalEngine", "num_segments", "check_truncate_steps", "PATHS"]

#: ``FunctionalEngine(path=...)`` values (``auto`` picks among the others)
PATHS = ("auto", "analytic", "autograd", "vmap", "vmap_grad")


class FunctionalEngine(InnerLoopEngine):
    """Pure-function inner loop, vectorised over the tasks of a meta-batch with ``vmap``.

    Parameters are a dict of tensors, the SGD step ``theta - lr * g`` is an ordinary tensor
    op, and ``torch.func.grad`` composes with the outer autograd graph, so second-order
    MAML needs nothing special. Supports SGD as the inner optimizer, plain or with
    heavy-ball momentum (``InnerLR.momentum``: the velocities are carried through the
    steps and checkpointed segments like the parameters; not compiled), fixed, scheduled
    or learned (scalar, per-tensor, per-unit, per-parameter, per-step, per-layer
    per-step) inner learning rates, and masks (rates that change along the loop: not
    compiled).

    Args:
        chunk_size: tasks per ``vmap`` chunk (None: all at once).
        checkpoint_segments: ``None``, ``auto`` (sqrt(T) segments) or a segment count:
            recompute-in-backward for second-order gradients of long inner loops.
        truncate_steps: differentiate only through the last ``k`` inner updates (None:
            all of them).
        path: how tasks are batched (see the module docstring); ``auto`` picks
            ``analytic``, ``autograd`` or ``vmap`` from the model's modules.
        hand_backward: on the ``analytic`` path, backpropagate through the inner loop
            with the hand-written reverse pass of :mod:`.second_order` where it covers
            the model and loss (False: autograd's graph of the same ops; both exact).
        compile: ``True`` runs few-shot meta-training steps (MAML, first-order MAML) of an
            MLP as ``torch.compile``-d programs of the inner loop and its hand-written
            reverse pass (:mod:`.compiled`); evaluation keeps the eager path. A model,
            loss or option the compiled program does not cover is a clear error.
            ``"eager"`` runs the same programs op by op (no C++ compiler; for debugging).
        skip_idle_steps: skip the trailing online steps that only see padding (same
            numbers; False runs them, e.g. to check that skipping them is exact).
    """

    name = "functional"

    def __init__(
        self,
        chunk_size: int | None = None,
        checkpoint_segments: int | str | None = None,
        truncate_steps: int | None = None,
        path: str = "auto",
        hand_backward: bool = True,
        compile: bool | str = False,
        skip_idle_steps: bool = True,
    ) -> None:
        num_segments(checkpoint_segments, 1)  # validates
        check_truncate_steps(truncate_steps)
        if path not in PATHS:
            raise ValueError(f"functional engine path={path!r}; allowed: {', '.join(PATHS)}")
        self.chunk_size = chunk_size
        self.checkpoint_segments = checkpoint_segments
        self.truncate_steps = truncate_steps
        self.path = path
        self.hand_backward = hand_backward
        if compile not in (False, True, "eager"):
            raise ValueError(f"engine.compile={compile!r}; allowed: false, true, eager")
        if compile and (path not in ("auto", "analytic") or not hand_backward):
            raise ValueError(
                f"engine.compile={compile} runs the hand-written reverse pass of the "
                f"analytic path; it does not combine with path={path!r}, "
                f"hand_backward={hand_backward}"
            )
        self.compile = compile
        self.skip_idle_steps = skip_idle_steps

    @classmethod
    def from_options(cls, inner_optimizer, inner_optimizer_kwargs, options):
        if inner_optimizer != "sgd" or inner_optimizer_kwargs:
            raise ValueError(
                f"engine.inner_optimizer={{name: {inner_optimizer}, {inner_optimizer_kwargs}}} "
                "needs engine=higher: the functional engine runs plain SGD "
                "(inner_optimizer.name=sgd, no extra options)"
            )
        options = dict(options)
        learned = options.pop("inner_lr_learned", "none")  # every mode is supported
        schedule = options.pop("inner_lr_schedule", "constant")
        momentum = options.pop("inner_momentum", 0.0)
        if options.get("compile") and per_step_rates(learned, schedule):
            raise ValueError(_COMPILE_PER_STEP.format(compile=options["compile"]))
        if options.get("compile") and momentum:
            raise ValueError(_COMPILE_MOMENTUM.format(compile=options["compile"], beta=momentum))
        return cls(**options)

    def resolve_path(self, model: nn.Module, names: list[str] | None = None) -> tuple[str, object]:
        """``(path, compiled model or None)`` this engine runs ``model`` with."""
        if names is None:
            names = [n for n, _ in model.named_parameters()]
        if self.path == "vmap_grad":
            return "vmap_grad", None
        batched = compile_model(model, names) if self.path != "vmap" else None
        if self.path == "auto":
            if batched is None:
                return "vmap", None
            return ("analytic" if batched.analytic else "autograd"), batched
        if self.path in ("analytic", "autograd") and batched is None:
            raise ValueError(
                f"functional engine path={self.path!r}: {type(model).__name__} holds a "
                "module without a batched form; allowed for it: auto, vmap, vmap_grad"
            )
        if self.path == "analytic" and not batched.analytic:
            raise ValueError(
                "functional engine path='analytic': some module of "
                f"{type(model).__name__} has no hand-written backward; allowed for it: "
                "auto, autograd, vmap, vmap_grad"
            )
        return self.path, batched

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
        return_adapted: bool = False,
    ) -> InnerLoopResult:
        if self.compile:
            result = self._run_compiled(
                model, batch, loss_fn, lr, schedule, grad_mode, track_query or return_adapted
            )
            if result is not None:
                return result
        named = list(model.named_parameters())
        names = [n for n, _ in named]
        theta = [p for _, p in named]
        rates = lr.rates_by_name()
        if grad_mode == "none":
            theta = [p.detach() for p in theta]
            rates = {k: (r.detach() if torch.is_tensor(r) else r) for k, r in rates.items()}
        num_tasks = batch.num_tasks
        # every task starts from the shared initial parameters (a view, no copy)
        params = [p.expand(num_tasks, *p.shape) for p in theta]
        slices = schedule.slices(batch.support_x.shape[1])
        records = first_visit(slices)
        num_steps = len(slices)
        step_rates = lr.step_rates(num_steps)
        n_first_order = first_order_before(num_steps, grad_mode, self.truncate_steps)
        path, batched = self.resolve_path(model, names)
        track = track_query and batch.has_query
        momentum = lr.momentum
        if path == "vmap_grad":
            runner = SegmentRunner(
                model, names, loss_fn, rates, self.chunk_size, track, step_rates, momentum
            )
        else:
            runner = BatchedRunner(
                model, names, loss_fn, rates, self.chunk_size, track, path, batched,
                hand_backward=self.hand_backward, step_rates=step_rates, momentum=momentum,
            )  # fmt: skip
        # the state each step carries: the parameters, then (momentum) their velocities,
        # zero before the first step
        if momentum:
            params = params + [p.new_zeros(()).expand(p.shape) for p in params]
        num_state = len(params)
        data = (batch.support_x, batch.support_y, batch.support_mask)
        query = (batch.query_x, batch.query_y) if batch.has_query else None

        # steps past the longest sequence of the batch only see padding: no loss, no
        # update. They are skipped (their step losses are zeros, as they would be)
        ran = (
            steps_with_data(slices, batch.support_mask) if schedule.num_steps is None else num_steps
        )

        segments = 1
        if grad_mode == "second_order" and torch.is_grad_enabled():
            segments = num_segments(self.checkpoint_segments, ran)
        bounds = segment_bounds(ran, segments)

        step_losses, element_losses, query_losses = [], [], []
        if query is not None and track_query:
            query_losses.append(runner.query_losses(params[: len(names)], query))
        for a, b in zip(bounds[:-1], bounds[1:]):
            steps = [
                (slices[i][0], slices[i][1], records[i], i < n_first_order, i) for i in range(a, b)
            ]
            if segments > 1:  # the velocities too are a segment's inputs and outputs
                segment = _flat_segment(runner, steps, query, data, num_state)
                outs = RecomputedSegment.apply(segment, *params, *runner.rate_tensors)
            else:
                outs = runner.segment(steps, query, data, params, runner.rate_tensors)
            params = list(outs[:num_state])
            seg_steps, seg_elements, seg_query = outs[num_state:]
            step_losses.append(seg_steps)
            if seg_elements.shape[1]:
                element_losses.append(seg_elements)
            if query is not None and track_query:
                query_losses.append(seg_query)
        params = params[: len(names)]
        if query is not None and not track_query:
            query_losses.append(runner.query_losses(params, query))

        elements = (
            torch.cat(element_losses, 1)
            if element_losses
            else batch.support_x.new_zeros((num_tasks, 0), dtype=step_losses[0].dtype)
        )
        if ran < num_steps:
            step_losses.append(step_losses[0].new_zeros((num_tasks, num_steps - ran)))
            if query is not None and track_query:  # the skipped steps change nothing
                query_losses.append(query_losses[-1][:, -1:].expand(-1, num_steps - ran))
        return InnerLoopResult(
            step_losses=torch.cat(step_losses, 1),
            element_losses=_pad_to(elements, batch.support_x.shape[1]),
            query_losses=(
                torch.cat([q.reshape(num_tasks, -1) for q in query_losses], 1)
                if query is not None
                else None
            ),
            adapted=dict(zip(names, params)) if return_adapted else None,
        )

    def _run_compiled(self, model, batch, loss_fn, lr, schedule, grad_mode, eager_only):
        """A few-shot meta-training step through the compiled programs (None: this call
        is not one, e.g. evaluation; the eager path runs it)."""
        plan_ = compiled_plan.plan(model)  # a model it does not cover is an error on any call
        loss = compiled_plan.check_call(loss_fn, self.checkpoint_segments)
        if lr.per_step:
            raise ValueError(_COMPILE_PER_STEP.format(compile=self.compile))
        if lr.momentum:
            raise ValueError(_COMPILE_MOMENTUM.format(compile=self.compile, beta=lr.momentum))
        if (
            eager_only
            or grad_mode == "none"
            or not torch.is_grad_enabled()
            or schedule.num_steps is None
            or not batch.has_query
        ):
            return None
        num_steps = schedule.num_steps
        n_first_order = first_order_before(num_steps, grad_mode, self.truncate_steps)
        first_order = tuple(i < n_first_order for i in range(num_steps))
        objective, query, steps, elements = compiled.run_compiled(
            model,
            plan_,
            loss,
            lr.rates_by_name(),
            batch,
            first_order,
            compile_=self.compile is True,
        )
        return InnerLoopResult(
            step_losses=steps,
            element_losses=elements,
            query_losses=query,
            objective=objective,
        )


_COMPILE_PER_STEP = (
    "engine.compile={compile} with inner rates that change along the inner loop "
    "(algorithm.inner_lr_schedule other than constant, or inner_lr_learned=per_step|"
    "per_layer_per_step): the compiled program takes one rate per tensor for every step; "
    "allowed: engine.compile=false"
)


_COMPILE_MOMENTUM = (
    "algorithm.inner_momentum={beta} with engine.compile={compile}: the compiled program "
    "runs plain SGD steps; allowed: engine.compile=false (the eager functional engine runs "
    "inner momentum), or algorithm.inner_momentum=0"
)


def _pad_to(element_losses: torch.Tensor, length: int) -> torch.Tensor:
    """Element losses of schedules that visit fewer than all elements, zero-padded."""
    missing = length - element_losses.shape[1]
    if missing > 0:
        element_losses = torch.nn.functional.pad(element_losses, (0, missing))
    return element_losses


def _flat_segment(runner, steps, query, data, num_params):
    """``runner.segment`` of ``steps`` as a function of flat tensors (the parameters,
    then the learned rates): what a recomputed segment runs twice."""

    def segment(*tensors):
        params, rate_tensors = list(tensors[:num_params]), list(tensors[num_params:])
        return runner.segment(steps, query, data, params, rate_tensors)

    return segment
