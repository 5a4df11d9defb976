"""The one SGD update every engine and the sampler take: ``p - r * g``."""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["sgd_update"]


def sgd_update(
    params: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor | None],
    rates: Mapping[str, torch.Tensor | float] | torch.Tensor | float,
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
        rate = rates[name] if per_name else rates
        out[name] = p - rate * g
    return out
