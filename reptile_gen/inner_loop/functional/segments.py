"""The functional engine's generic runner: ``vmap`` over tasks of ``grad`` of a
``functional_call`` (the ``vmap_grad`` path)."""

from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap

from reptile_gen.inner_loop.core import RateSlots, masked_mean, momentum_update, sgd_update

__all__ = ["SegmentRunner"]


class SegmentRunner:
    """Runs a stretch of inner steps for all tasks at once (``vmap`` over tasks of
    ``grad``): the ``vmap_grad`` path."""

    def __init__(
        self, model, names, loss_fn, rates, chunk_size, track_query, step_rates=None, momentum=0.0
    ) -> None:
        self.model = model
        self.momentum = momentum  # with momentum the state is the params, then velocities
        self.names = names
        self.loss_fn = loss_fn
        # learned rates become explicit inputs (so a checkpointed segment can return
        # their gradients); fixed ones stay floats
        self.slots = RateSlots(rates, step_rates)
        self.rate_tensors = self.slots.tensors
        self.chunk_size = chunk_size
        self.track_query = track_query
        self.buffers = dict(model.named_buffers())

        def step_loss(p, x, y, m):
            elements = loss_fn(functional_call(model, (p, self.buffers), (x,)), y)
            return masked_mean(elements, m), elements * m.to(elements.dtype)

        self.step_grad = grad(step_loss, has_aux=True)

    def _query_loss(self, p, qx, qy):
        return self.loss_fn(functional_call(self.model, (p, self.buffers), (qx,)), qy).mean()

    def query_losses(self, params, query) -> torch.Tensor:
        """``[B]`` query loss at batched ``params``."""

        def one(qx, qy, *p):
            return self._query_loss(dict(zip(self.names, p)), qx, qy)

        return vmap(one, chunk_size=self.chunk_size)(*query, *params)

    def segment(self, steps, query, data, params, rate_tensors):
        """Run ``steps`` (``(start, end, record, first_order, index)`` each) from batched
        ``params`` (with momentum: then their velocities) with the learned rates
        ``rate_tensors``; returns the new params (and velocities),
        ``[B, n]`` step losses, ``[B, e]`` element losses of the recorded steps, and
        ``[B, n]`` query losses (if tracked)."""
        track_query = self.track_query and query is not None

        n = len(self.names)

        def one_task(sx, sy, sm, qx, qy, *flat):
            p = dict(zip(self.names, flat[:n]))
            v = dict(zip(self.names, flat[n:]))
            step_losses, element_losses, query_losses = [], [], []
            for start, end, record, first_order, index in steps:
                x, y, m = sx[start:end], sy[start:end], sm[start:end]
                grads, elements = self.step_grad(p, x, y, m)
                # the step's loss again from its elements (no second forward pass)
                step_losses.append(elements.sum() / m.sum().clamp(min=1).to(elements.dtype))
                if record:
                    element_losses.append(elements)
                if first_order:
                    grads = {k: g.detach() for k, g in grads.items()}
                rates = self.slots.rates(rate_tensors, index)
                if self.momentum:
                    p, v = momentum_update(p, v, grads, rates, self.momentum, m.any())
                else:
                    p = sgd_update(p, grads, rates)
                if track_query:
                    query_losses.append(self._query_loss(p, qx, qy))
            zero = sx.new_zeros((0,), dtype=flat[0].dtype)
            return (
                *(p[k] for k in self.names),
                *(v[k] for k in self.names if v),
                torch.stack(step_losses) if step_losses else zero,
                torch.cat(element_losses) if element_losses else zero,
                torch.stack(query_losses) if query_losses else zero,
            )

        qx, qy = query if query is not None else (data[0], data[1])
        return vmap(one_task, chunk_size=self.chunk_size, randomness="different")(
            *data, qx, qy, *params
        )
