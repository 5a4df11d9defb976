"""The one SGD update every engine and the sampler take: ``p - r * g``, or with inner
momentum (``algorithm.inner_momentum``) the heavy-ball step ``v = beta * v + g``,
``p - r * v`` (:func:`momentum_step`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "UPDATE_FORMS",
    "check_momentum",
    "momentum_step",
    "momentum_update",
    "sgd_step",
    "sgd_update",
    "sgd_update_list",
]

#: how :func:`sgd_step` writes ``p - r * g``: ``plain`` (two ops, as written), ``fused``
#: (one op: ``add`` with ``alpha`` or ``addcmul``) or ``inplace`` (into ``p``'s memory)
UPDATE_FORMS = ("plain", "fused", "inplace")


def sgd_step(
    p: torch.Tensor, g: torch.Tensor, rate: torch.Tensor | float, form: str = "plain"
) -> torch.Tensor:
    """``p - rate * g`` for one tensor, written as ``form`` (see :data:`UPDATE_FORMS`;
    all three are the same update, ``fused`` and ``inplace`` in fewer kernels)."""
    if form == "plain":
        return p - rate * g
    if form == "fused":
        if torch.is_tensor(rate):
            return torch.addcmul(p, rate, g, value=-1)
        return torch.add(p, g, alpha=-rate)
    if form == "inplace":
        return p.sub_(rate * g) if torch.is_tensor(rate) else p.sub_(g, alpha=rate)
    raise ValueError(f"sgd update form={form!r}; allowed: {', '.join(UPDATE_FORMS)}")


def sgd_update(
    params: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor | None],
    rates: Mapping[str, torch.Tensor | float] | torch.Tensor | float,
    form: str = "plain",
) -> dict[str, torch.Tensor]:
    """``{name: params[name] - rate * grads[name]}``.

    ``rates`` is one rate for every tensor (a float or a scalar tensor) or a mapping from
    name to rate (a float, a scalar or a tensor broadcastable to the parameter: per-layer,
    per-step or per-parameter rates). A ``None`` gradient leaves its tensor unchanged.
    """
    per_name = isinstance(rates, Mapping)
    out = {}
    for name, p in params.items():
        g = grads[name]
        if g is None:
            out[name] = p
            continue
        out[name] = sgd_step(p, g, rates[name] if per_name else rates, form)
    return out


def sgd_update_list(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    rates: Sequence[torch.Tensor | float] | float,
    form: str = "plain",
) -> list[torch.Tensor]:
    """:func:`sgd_update` over parallel lists. One float rate for all tensors with
    ``form="fused"`` is a single ``_foreach_add``."""
    if not isinstance(rates, Sequence):
        if form == "fused" and not torch.is_tensor(rates):
            return list(torch._foreach_add(list(params), list(grads), alpha=-rates))
        rates = [rates] * len(params)
    return [sgd_step(p, g, r, form) for p, g, r in zip(params, grads, rates)]


def check_momentum(momentum) -> float:
    """``algorithm.inner_momentum`` as a float if it is a number in ``[0, 1)``."""
    ok = isinstance(momentum, (int, float)) and not isinstance(momentum, bool)
    if not ok or not math.isfinite(momentum) or not 0 <= momentum < 1:
        raise ValueError(
            f"algorithm.inner_momentum={momentum!r}; must be a number >= 0 and < 1 (0: plain "
            "SGD; beta in v = beta * v + g, p = p - inner_lr * v)"
        )
    return float(momentum)


def momentum_step(
    p: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    rate: torch.Tensor | float,
    momentum: float,
    active: torch.Tensor | None = None,
    form: str = "plain",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One heavy-ball step (Polyak 1964; ``torch.optim.SGD`` with ``momentum``, no
    dampening, no Nesterov): ``v' = momentum * v + g``, ``p' = p - rate * v'``; returns
    ``(p', v')``. The velocity starts at zero, so the first step is plain SGD (``v' = g``,
    as torch's first step sets the buffer to ``g``).

    ``active``: per task (a leading axis of ``p``, or a scalar inside ``vmap``), whether
    the step has a real element. A step that is all padding for a task is a no-op for it,
    its velocity included (with plain SGD its zero gradient makes it one by itself), as an
    optimizer that is not stepped (the ``higher`` engine skips such steps); None: every
    task's step is real. ``form``: how ``p - rate * v'`` is written (:func:`sgd_step`)."""
    v_new = torch.add(g, v, alpha=momentum)
    p_new = sgd_step(p, v_new, rate, form)
    if active is not None:
        keep = active.reshape(*active.shape, *([1] * (p.dim() - active.dim())))
        p_new = torch.where(keep, p_new, p)
        v_new = torch.where(keep, v_new, v)
    return p_new, v_new


def momentum_update(
    params: Mapping[str, torch.Tensor],
    velocity: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor | None],
    rates: Mapping[str, torch.Tensor | float],
    momentum: float,
    active: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """:func:`momentum_step` for every tensor: ``(params', velocity')`` by name (a
    ``None`` gradient leaves its tensor and velocity unchanged)."""
    new_p, new_v = {}, {}
    for name, p in params.items():
        g = grads[name]
        if g is None:
            new_p[name], new_v[name] = p, velocity[name]
            continue
        new_p[name], new_v[name] = momentum_step(
            p, velocity[name], g, rates[name], momentum, active
        )
    return new_p, new_v
