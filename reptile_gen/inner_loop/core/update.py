"""The one SGD update every engine and the sampler take: ``p - r * g``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = ["sgd_step", "sgd_update", "sgd_update_list", "UPDATE_FORMS"]

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
