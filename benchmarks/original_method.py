"""The original reptile-gen's algorithm as a benchmark baseline (``original_method``).

Every task gets its own copy of every weight (``[B, ...]``); each inner step runs the
model on all tasks at once with those copies (``vmap`` over ``functional_call``: batched
matrix products), takes each task's gradient with ``torch.autograd.grad`` and replaces the
copies by ``p - lr * g``. Second-order MAML keeps a copy of the parameters at the start
of each of ~sqrt(T) segments in a graph-free forward pass and then, segment by segment
from the last, re-runs the segment with ``create_graph=True`` and pulls the gradient back
through it; Reptile moves toward the task-mean of the final copies. This is the method
whose cost grows linearly in the sequence length with a large constant (a full weight
copy per task), the yardstick every sequence workload reports its engines against.

It runs the project's module (its model, loss, schedule and inner rate), so its
meta-gradient must equal the module's own (checked in float64 by ``benchmarks.run``).
Covered: fixed inner rates, the online objective (sequence tasks), grad modes ``none``
(Reptile), ``first_order`` and ``second_order`` with or without checkpointing; anything
else is refused rather than computed differently.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch.func import functional_call, vmap

from reptile_gen.data.task_batch import TaskBatch

__all__ = ["original_method_meta_loss", "all_positions_real"]


def _check_scope(module, batch: TaskBatch) -> None:
    if module.inner_lr.is_learned:
        raise ValueError("original_method baseline: learned inner learning rates are not supported")
    if module.objective != "online" or module.train_schedule.num_steps is not None:
        raise ValueError("original_method baseline: needs a sequence task (online objective)")
    if module.hparams.get("truncate_steps") is not None:
        raise ValueError("original_method baseline: truncate_steps is not supported")


def _segments(setting, num_steps: int) -> int:
    """How many checkpointed segments (the module's ``checkpoint_segments``)."""
    if setting is None or num_steps == 0:
        return 1
    if setting == "auto":
        return max(1, math.ceil(math.sqrt(num_steps)))
    return max(1, min(int(setting), num_steps))


class _Runner:
    """One meta-batch's per-task weight copies and the steps on them."""

    def __init__(self, module, batch: TaskBatch):
        self.model = module.model
        self.buffers = dict(self.model.named_buffers())
        self.loss = module.task_spec.elementwise_loss
        self.lr = module.inner_lr.init
        self.batch = batch
        self.slices = module.train_schedule.slices(batch.support_x.shape[1])
        self.real = batch.support_mask.sum().clamp(min=1)

    def outputs(self, params: dict, x: torch.Tensor) -> torch.Tensor:
        def one(p, xb):
            return functional_call(self.model, (p, self.buffers), (xb,))

        return vmap(one)(params, x)

    def step(self, params: dict, i: int, create_graph: bool):
        """``(new params, step loss summed over tasks, objective term)`` of inner step ``i``."""
        start, end = self.slices[i]
        x = self.batch.support_x[:, start:end]
        y = self.batch.support_y[:, start:end]
        raw = self.outputs(params, x)
        elements = self.loss(raw, y)  # [B, k]
        m = self.batch.support_mask[:, start:end].to(elements.dtype)
        per_task = (elements * m).sum(1) / m.sum(1).clamp(min=1)
        step_loss = per_task.sum()  # tasks are independent: sum -> each task's gradient
        grads = torch.autograd.grad(step_loss, list(params.values()), create_graph=create_graph)
        new = {n: p - self.lr * g for (n, p), g in zip(params.items(), grads)}
        return new, step_loss, (elements * m).sum() / self.real

    def copies(self) -> dict:
        num_tasks = self.batch.support_x.shape[0]
        return {
            n: p.detach()[None].repeat(num_tasks, *([1] * p.dim())).requires_grad_()
            for n, p in self.model.named_parameters()
        }


def _detached(params: dict) -> dict:
    return {n: p.detach().requires_grad_() for n, p in params.items()}


def _reptile(runner: _Runner):
    params = runner.copies()
    objective = 0.0
    for i in range(len(runner.slices)):
        params, _, term = runner.step(params, i, create_graph=False)
        params = _detached(params)
        objective += float(term.detach())
    loss = 0.0
    for name, theta in runner.model.named_parameters():
        loss = loss + 0.5 * (theta - params[name].detach().mean(0)).pow(2).sum()
    return loss, objective


def _first_order(runner: _Runner) -> tuple[dict, float]:
    params = runner.copies()
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    objective = 0.0
    for i in range(len(runner.slices)):
        # the objective term's gradient at the current copies (d theta_t / d theta_0 = I)
        new, _, term = runner.step(params, i, create_graph=True)
        grads = torch.autograd.grad(term, list(params.values()))
        for (n, _), g in zip(params.items(), grads):
            total[n] += g
        params = _detached(new)
        objective += float(term.detach())
    return total, objective


def _second_order(runner: _Runner, setting) -> tuple[dict, float]:
    num_steps = len(runner.slices)
    segments = _segments(setting, num_steps)
    interval = math.ceil(num_steps / segments) if num_steps else 1
    starts = list(range(0, num_steps, interval))
    checkpoints, objective = [], 0.0
    params = runner.copies()
    for i in range(num_steps):
        if i % interval == 0:
            checkpoints.append(_detached(params))
        params, _, term = runner.step(params, i, create_graph=False)
        params = _detached(params)
        objective += float(term.detach())
    grad_out = {n: torch.zeros_like(p) for n, p in params.items()}
    for start, checkpoint in zip(reversed(starts), reversed(checkpoints)):
        p, total = checkpoint, 0.0
        for i in range(start, min(start + interval, num_steps)):
            p, _, term = runner.step(p, i, create_graph=True)
            total = total + term
        total = total + sum((p[n] * grad_out[n]).sum() for n in p)
        grads = torch.autograd.grad(total, list(checkpoint.values()))
        grad_out = dict(zip(checkpoint, grads))
    return grad_out, objective


def original_method_meta_loss(module, batch: TaskBatch):
    """The module's meta-loss computed the original's way; ``(loss, logs)`` where
    ``loss.backward()`` leaves the module's meta-gradient in ``.grad``."""
    _check_scope(module, batch)
    runner = _Runner(module, batch)
    grad_mode = module.grad_mode
    if grad_mode == "none":
        loss, objective = _reptile(runner)
        return loss, {"online_loss": torch.tensor(objective)}
    if grad_mode == "first_order":
        per_task, objective = _first_order(runner)
    elif grad_mode == "second_order":
        per_task, objective = _second_order(runner, module.hparams.get("checkpoint_segments"))
    else:
        raise ValueError(f"original_method baseline: grad mode {grad_mode!r} is not supported")
    # a surrogate with the objective's value whose gradient is the task-summed gradient
    loss = torch.zeros((), dtype=next(module.model.parameters()).dtype)
    for name, theta in module.model.named_parameters():
        g = per_task[name].sum(0)
        loss = loss + (theta * g).sum() - (theta.detach() * g).sum()
    return loss + objective, {}


def all_positions_real(source):
    """A batch source whose every support position is a real element (the padding of a
    short text line becomes NUL targets that are trained on), the work the original does
    on every sequence: engines that skip padded steps then do the same work as it."""

    def real(datamodule, num_batches: int, seed: int) -> list[TaskBatch]:
        return [
            replace(b, support_mask=torch.ones_like(b.support_mask))
            for b in source(datamodule, num_batches, seed)
        ]

    real.__name__ = f"all_positions_real({getattr(source, '__name__', 'batches')})"
    return real
