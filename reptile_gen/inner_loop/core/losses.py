"""The losses by output kind, each with its closed-form gradient w.r.t. the logits and
its curvature (one table: a new output kind touches only :data:`LOSSES`).

An engine takes the closed form when the loss says which kind it is
(:func:`loss_kind`); any other loss gets its gradient from autograd.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from reptile_gen.data.task_spec import TaskSpec

__all__ = ["ClosedFormLoss", "LOSSES", "closed_form_loss", "loss_kind", "loss_named"]


def _mse_and_grad(pred, target):
    diff = pred - target
    squared = diff.pow(2)
    # a mean over one output is the value itself (a view, not a reduction kernel)
    elements = squared.squeeze(-1) if diff.shape[-1] == 1 else squared.mean(-1)
    return elements, diff * (2.0 / diff.shape[-1])


def _mse_curvature(pred, target, r, weights, seed):
    return torch.addcmul(seed, r, weights.unsqueeze(-1), value=2.0 / pred.shape[-1])


def _cross_entropy_and_grad(pred, target):
    # what F.cross_entropy computes (nll of log_softmax); gradient softmax - one_hot
    logp = torch.log_softmax(pred, -1)
    index = target.long().unsqueeze(-1)
    elements = -logp.gather(-1, index).squeeze(-1)
    one_hot = torch.zeros_like(logp).scatter_(-1, index, 1.0)
    return elements, logp.exp() - one_hot


def _cross_entropy_curvature(pred, target, r, weights, seed):
    p = torch.softmax(pred, -1)
    curvature = p * (r - (p * r).sum(-1, keepdim=True))
    return torch.addcmul(seed, curvature, weights.unsqueeze(-1))


def _bce_and_grad(pred, target):
    logits, target = pred.squeeze(-1), target.to(pred.dtype)
    elements = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return elements, (torch.sigmoid(logits) - target).unsqueeze(-1)


def _bce_curvature(pred, target, r, weights, seed):
    s = torch.sigmoid(pred)
    return torch.addcmul(seed, r, (s * (1 - s)).mul_(weights.unsqueeze(-1)))


@dataclass(frozen=True)
class ClosedFormLoss:
    """One output kind's per-element loss in closed form.

    Attributes:
        name: the loss's name (``mse``, ``cross_entropy``, ``bce``).
        loss_and_grad: ``(pred, target) -> (elements, d element / d pred)``.
        curvature: ``(pred, target, r, weights, seed) -> seed + weights * H r``, the
            Hessian of the loss w.r.t. ``pred`` applied to the tangent ``r``.
    """

    name: str
    loss_and_grad: Callable
    curvature: Callable

    def __call__(self, pred, target):
        return self.loss_and_grad(pred, target)


#: the closed-form loss of each output kind
LOSSES = {
    "real": ClosedFormLoss("mse", _mse_and_grad, _mse_curvature),
    "classes": ClosedFormLoss("cross_entropy", _cross_entropy_and_grad, _cross_entropy_curvature),
    "bits": ClosedFormLoss("bce", _bce_and_grad, _bce_curvature),
}


def loss_kind(loss_fn) -> str | None:
    """The output kind (a key of :data:`LOSSES`) whose loss ``loss_fn`` declares it
    computes, or None.

    Declared by: a callable object with an ``output_kind`` attribute; a task spec's own
    ``TaskSpec.elementwise_loss`` (bound to a spec whose class does not override it); a
    bound method whose owner has a ``loss_kind`` attribute (a meta-learner's ``loss_fn``).
    """
    owner = getattr(loss_fn, "__self__", None)
    if owner is None:
        kind = getattr(loss_fn, "output_kind", None)
        return kind if isinstance(kind, str) else None
    if isinstance(owner, TaskSpec):
        own = TaskSpec.elementwise_loss
        if loss_fn.__func__ is own and type(owner).elementwise_loss is own:
            return owner.output_kind
        return None
    kind = getattr(owner, "loss_kind", None)
    return kind if isinstance(kind, str) else None


def closed_form_loss(loss_fn) -> ClosedFormLoss | None:
    """The closed form of ``loss_fn`` if it declares an output kind (see
    :func:`loss_kind`), else None (the gradient then comes from autograd)."""
    kind = loss_kind(loss_fn)
    return LOSSES.get(kind) if kind is not None else None


def loss_named(name: str) -> ClosedFormLoss:
    """The closed-form loss called ``name`` (``mse``, ``cross_entropy``, ``bce``)."""
    for loss in LOSSES.values():
        if loss.name == name:
            return loss
    raise KeyError(name)
