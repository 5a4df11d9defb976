"""The plan of an inner-loop run: which elements each step trains on, which steps are
first order (first-order MAML, truncation), the checkpoint segments, the steps that only
see padding and each step's element weights."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "GRAD_MODES",
    "InnerSchedule",
    "check_truncate_steps",
    "first_order_before",
    "first_visit",
    "last_active_step",
    "num_segments",
    "segment_bounds",
    "steps_with_data",
    "step_weights",
]

GRAD_MODES = ("second_order", "first_order", "none")


@dataclass(frozen=True)
class InnerSchedule:
    """Which support elements each inner SGD step trains on.

    Two shapes cover every use:

    * few-shot (``num_steps`` set): ``num_steps`` steps, each on the whole support set
      (K-shot regression, as in MAML's sine study);
    * online (``num_steps`` None): one step per ``inner_batch_size`` consecutive elements,
      in order (SGD as a sequence model: 1 element per step is the original model).
    """

    num_steps: int | None = None
    inner_batch_size: int = 1

    def slices(self, support_len: int) -> list[tuple[int, int]]:
        """``(start, end)`` of the support elements used by each step."""
        if self.num_steps is not None:
            return [(0, support_len)] * self.num_steps
        b = self.inner_batch_size
        return [(s, min(s + b, support_len)) for s in range(0, support_len, b)]

    def with_steps(self, num_steps: int) -> InnerSchedule:
        return InnerSchedule(num_steps=num_steps, inner_batch_size=self.inner_batch_size)


def check_truncate_steps(value) -> None:
    """``truncate_steps`` must be ``None`` or an integer >= 0 (a clear error otherwise)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"algorithm.truncate_steps={value!r}; allowed: null or an integer >= 0")


def first_order_before(num_steps: int, grad_mode: str, truncate_steps: int | None) -> int:
    """How many leading steps are first order: all of them for first-order MAML, the
    ones before the last ``truncate_steps`` for truncated second order, else none."""
    if grad_mode == "first_order":
        return num_steps
    if grad_mode == "second_order" and truncate_steps is not None:
        return max(num_steps - truncate_steps, 0)
    return 0


def num_segments(setting, num_steps: int) -> int:
    """Segments for ``checkpoint_segments`` = ``None`` (1: no checkpointing), ``auto``
    (``ceil(sqrt(T))``) or an integer (capped at the number of steps)."""
    if setting is None:
        return 1
    if setting == "auto":
        return max(1, math.ceil(math.sqrt(num_steps)))
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise ValueError(
            f"algorithm.checkpoint_segments={setting!r}; allowed: null, auto, or an integer >= 1"
        )
    return max(1, min(setting, num_steps))


def segment_bounds(num_steps: int, segments: int) -> list[int]:
    """The ``segments + 1`` step indices that cut ``num_steps`` steps into even segments."""
    return [round(i * num_steps / segments) for i in range(segments + 1)]


def first_visit(slices: list[tuple[int, int]]) -> list[bool]:
    """For each step, whether it is the first to visit its elements (its pre-update losses
    are then those elements' online losses)."""
    frontier, out = 0, []
    for start, end in slices:
        out.append(start >= frontier and end > start)
        frontier = max(frontier, end)
    return out


def last_active_step(mask: torch.Tensor, slices: list[tuple[int, int]]) -> torch.Tensor:
    """``[B]`` index of each task's last step with a real (unmasked) element, -1 if none.
    A step whose elements are all padding is a no-op for the task (zero loss, zero
    gradient), so nothing needs to run for it."""
    if not slices:
        return torch.full(mask.shape[:1], -1, dtype=torch.long, device=mask.device)
    # real elements before each position; a slice is active if the count grows over it
    count = torch.nn.functional.pad(mask.long().cumsum(1), (1, 0))
    length = mask.shape[1]
    starts = torch.tensor([min(s, length) for s, _ in slices], device=mask.device)
    ends = torch.tensor([min(max(s, e), length) for s, e in slices], device=mask.device)
    active = count[:, ends] > count[:, starts]  # [B, T]
    index = torch.arange(len(slices), device=mask.device)
    return torch.where(active, index, -1).amax(1)


def steps_with_data(slices: list[tuple[int, int]], mask: torch.Tensor) -> int:
    """How many leading steps to run: all but the trailing ones whose elements are
    padding in every task (all of them if no element is real)."""
    last = int(last_active_step(mask, slices).max()) if slices else -1
    return last + 1 if last >= 0 else len(slices)


def step_weights(mask: torch.Tensor, start: int, end: int, dtype) -> tuple:
    """``(mask, weights)`` of the step over elements ``start:end``: each task's step loss
    is the masked mean over its elements, ``sum_i weights_i * loss_i``."""
    m = mask[:, start:end].to(dtype)
    return m, m / m.sum(1, keepdim=True).clamp(min=1)
