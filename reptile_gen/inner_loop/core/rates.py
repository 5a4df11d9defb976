"""Inner learning rates: fixed or meta-learned (one object for every engine).

Learning-rate convention: ``inner_lr`` is the step size of each task's own SGD, applied to
that task's loss (the mean over the elements of one inner step). It is never scaled by
the meta-batch size or by the number of tasks.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["InnerLR", "LEARNED_LR_MODES", "RateSlots", "split_rates"]

LEARNED_LR_MODES = ("none", "scalar", "per_tensor", "per_parameter")


def _key(name: str) -> str:
    return name.replace(".", "__")


class InnerLR(nn.Module):
    """Inner learning rates, fixed or meta-learned (Meta-SGD, Li et al. 2017).

    Args:
        names_and_shapes: ``(name, shape)`` of each adapted parameter.
        init: the initial (or fixed) learning rate, > 0.
        learned: ``none`` (a fixed float), ``scalar`` (one learned rate), ``per_tensor``
            (one per parameter tensor) or ``per_parameter`` (one per weight, Meta-SGD).
    """

    def __init__(self, names_and_shapes, init: float, learned: str = "none") -> None:
        super().__init__()
        if learned not in LEARNED_LR_MODES:
            raise ValueError(
                f"inner_lr_learned={learned!r}; allowed: {', '.join(LEARNED_LR_MODES)}"
            )
        self.init = float(init)
        self.learned = learned
        self.names = [n for n, _ in names_and_shapes]
        if learned == "scalar":
            self.scalar = nn.Parameter(torch.tensor(self.init))
        elif learned in ("per_tensor", "per_parameter"):
            self.rates = nn.ParameterDict(
                {
                    _key(n): nn.Parameter(
                        torch.full(tuple(s) if learned == "per_parameter" else (), self.init)
                    )
                    for n, s in names_and_shapes
                }
            )

    @property
    def is_learned(self) -> bool:
        return self.learned != "none"

    def rates_by_name(self) -> dict[str, torch.Tensor | float]:
        """Learning rate of each adapted parameter (a float, or a tensor that broadcasts)."""
        if self.learned == "none":
            return dict.fromkeys(self.names, self.init)
        if self.learned == "scalar":
            return dict.fromkeys(self.names, self.scalar)
        return {n: self.rates[_key(n)] for n in self.names}

    def extra_repr(self) -> str:
        return f"learned={self.learned}, init={self.init}"


def split_rates(rates: dict) -> tuple[list[torch.Tensor], dict[str, int | None]]:
    """Learned rates (tensors) become explicit inputs, so that a checkpointed segment can
    return their gradients; fixed ones stay floats. Returns the distinct rate tensors in
    first-seen order and, per parameter name, the index of its rate tensor (None for a
    fixed rate)."""
    tensors = list(dict.fromkeys(r for r in rates.values() if torch.is_tensor(r)))
    index = {id(t): i for i, t in enumerate(tensors)}
    return tensors, {k: index[id(r)] if torch.is_tensor(r) else None for k, r in rates.items()}


class RateSlots:
    """``{name: rate}`` split into the learned rate tensors (explicit inputs of a
    checkpointed segment, which returns their gradients) and the fixed floats.

    Attributes:
        tensors: the distinct learned rate tensors, in first-seen order.
        slots: per parameter name, the index of its rate in ``tensors`` (None: fixed).
        fixed: the fixed rates by name.
    """

    def __init__(self, rates: dict) -> None:
        self.tensors, self.slots = split_rates(rates)
        self.fixed = {k: r for k, r in rates.items() if not torch.is_tensor(r)}

    def rates(self, tensors) -> dict:
        """``{name: rate}`` with the learned rates taken from ``tensors``."""
        return {
            k: (self.fixed[k] if slot is None else tensors[slot]) for k, slot in self.slots.items()
        }
