"""The default engine: ``torch.func`` (``functional_call`` + ``grad`` + ``vmap`` over tasks)."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from reptile_gen.data.task_batch import TaskBatch
from reptile_gen.inner_loop.base import (
    InnerLoopEngine,
    InnerLoopResult,
    LossFn,
    first_visit,
    masked_mean,
)
from reptile_gen.inner_loop.schedule import InnerLR, InnerSchedule

__all__ = ["FunctionalEngine"]


class FunctionalEngine(InnerLoopEngine):
    """Pure-function inner loop, vectorised over the tasks of a meta-batch with ``vmap``.

    Parameters are a dict of tensors, the SGD step ``theta - lr * g`` is an ordinary tensor
    op, and ``torch.func.grad`` composes with the outer autograd graph, so second-order
    MAML needs nothing special. Supports plain SGD as the inner optimizer, fixed or
    learned (scalar, per-tensor, per-parameter) inner learning rates, and masks.

    Args:
        chunk_size: tasks per ``vmap`` chunk (None: all at once). Smaller chunks bound
            memory on large meta-batches.
    """

    name = "functional"

    def __init__(self, chunk_size: int | None = None) -> None:
        self.chunk_size = chunk_size

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
        params = dict(model.named_parameters())
        rates = lr.rates_by_name()
        if grad_mode == "none":
            params = {k: v.detach() for k, v in params.items()}
            rates = {k: (r.detach() if torch.is_tensor(r) else r) for k, r in rates.items()}
        buffers = dict(model.named_buffers())
        slices = schedule.slices(batch.support_x.shape[1])
        records = first_visit(slices)
        has_query = batch.has_query
        first_order = grad_mode == "first_order"

        def step_loss(p, x, y, m):
            elements = loss_fn(functional_call(model, (p, buffers), (x,)), y)
            return masked_mean(elements, m), elements * m.to(elements.dtype)

        step_grad = grad(step_loss, has_aux=True)

        def query_loss(p, qx, qy):
            return loss_fn(functional_call(model, (p, buffers), (qx,)), qy).mean()

        def one_task(sx, sy, sm, qx, qy):
            p = params
            step_losses, element_losses, query_losses = [], [], []
            if has_query and track_query:
                query_losses.append(query_loss(p, qx, qy))
            for (start, end), record in zip(slices, records):
                x, y, m = sx[start:end], sy[start:end], sm[start:end]
                grads, elements = step_grad(p, x, y, m)
                # the loss value again, from the aux elements (no second forward pass)
                step_losses.append(elements.sum() / m.sum().clamp(min=1).to(elements.dtype))
                if record:
                    element_losses.append(elements)
                if first_order:
                    grads = {k: g.detach() for k, g in grads.items()}
                p = {k: p[k] - rates[k] * grads[k] for k in p}
                if has_query and track_query:
                    query_losses.append(query_loss(p, qx, qy))
            if has_query and not track_query:
                query_losses.append(query_loss(p, qx, qy))
            out = (
                torch.stack(step_losses),
                torch.cat(element_losses),
                torch.stack(query_losses) if has_query else torch.zeros(()),
            )
            return out + ((p,) if return_adapted else ())

        qx = batch.query_x if has_query else batch.support_x
        qy = batch.query_y if has_query else batch.support_y
        outs = vmap(one_task, chunk_size=self.chunk_size, randomness="different")(
            batch.support_x, batch.support_y, batch.support_mask, qx, qy
        )
        return InnerLoopResult(
            step_losses=outs[0],
            element_losses=_pad_to(outs[1], batch.support_x.shape[1]),
            query_losses=outs[2] if has_query else None,
            adapted=outs[3] if return_adapted else None,
        )


def _pad_to(element_losses: torch.Tensor, length: int) -> torch.Tensor:
    """Element losses of schedules that visit fewer than all elements, zero-padded."""
    missing = length - element_losses.shape[1]
    if missing > 0:
        element_losses = torch.nn.functional.pad(element_losses, (0, missing))
    return element_losses
