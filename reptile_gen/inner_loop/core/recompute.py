"""Segment checkpointing for every engine: a stretch of the inner loop run without its
graph in forward and recomputed with it in backward.

Exact gradients for the memory of one segment's unroll instead of all of them.
``torch.utils.checkpoint`` does not serve here: its reentrant form refuses
``autograd.grad`` inside the segment and its non-reentrant form refuses ``torch.func.grad``.

:class:`RecomputedSegment` is the whole mechanism for a segment that is a function of its
tensor inputs (the functional engine). An engine whose segments share state across the
whole loop (the low-rank engine's history buffers, written in forward and read by every
later segment) keeps its own ``autograd.Function`` and builds its backward from the same
pieces: :func:`leaves`, :func:`vjp` and :func:`add_grad`. :func:`add_grad` also sums the
gradients of the learned rates in the hand-written reverse passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["RecomputedSegment", "add_grad", "leaves", "vjp"]


def leaves(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Fresh graph leaves with the values of ``tensors`` (saved inputs restored in
    backward); each requires a gradient iff its original did."""
    return [t.detach().requires_grad_(t.requires_grad) for t in tensors]


def vjp(outputs, grad_outputs, inputs) -> list[torch.Tensor | None]:
    """The gradient of ``sum <grad_output, output>`` w.r.t. each of ``inputs``, over the
    outputs that received a gradient and have a graph; None for an input that needs no
    gradient or that those outputs do not use."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
    wanted = [t for t in inputs if t.requires_grad]
    if not pairs or not wanted:
        return [None] * len(inputs)
    grads = iter(
        torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
    )
    return [next(grads) if t.requires_grad else None for t in inputs]


def add_grad(total: torch.Tensor | None, g: torch.Tensor | None) -> torch.Tensor | None:
    """``total + g`` with None standing for zero: a gradient summed over segments, steps
    or the parameters that share one learned rate (or a tangent over a layer's terms)."""
    if total is None:
        return g
    return total if g is None else total + g


class RecomputedSegment(torch.autograd.Function):
    """``segment(*tensors)`` (a tuple of tensors) recomputed in backward.

    Forward runs the segment without a graph and saves only its inputs. Backward reruns
    it with the graph from those inputs (made :func:`leaves`: second order included) and
    backpropagates the incoming output gradients to every input that requires one (the
    segment's input parameters, the learned inner rates). Usage:
    ``RecomputedSegment.apply(segment, *tensors)``; ``segment`` must compute the same
    outputs from the same inputs twice (no randomness it does not fix itself).
    """

    @staticmethod
    def forward(ctx, segment: Callable, *tensors):
        ctx.segment = segment
        ctx.save_for_backward(*tensors)
        with torch.no_grad():
            outs = segment(*tensors)
        return tuple(o.detach() for o in outs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        inputs = leaves(ctx.saved_tensors)
        with torch.enable_grad():
            outs = ctx.segment(*inputs)
        return (None, *vjp(outs, grad_outputs, inputs))
