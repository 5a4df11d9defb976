"""The divergence guard: the first non-finite inner loss, meta-loss or meta-gradient of
a training step stops the run with a :class:`Diverged` error that names where it
happened (meta-step, tasks, inner step) and the inner learning rates in force (the class
lives with the project's other errors, :mod:`reptile_gen.utils.errors`).

Every engine's results pass through :class:`DivergenceGuard`: the module records the
inner losses and the meta-loss of a step (:meth:`DivergenceGuard.check_losses`) and
raises before the optimizer step (:meth:`DivergenceGuard.check_before_step`), after the
meta-gradient has been averaged across DDP ranks, so every rank raises at the same step
and no optimizer step (and so no checkpoint) ever holds a non-finite state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from reptile_gen.utils.errors import Diverged

__all__ = ["Diverged", "DivergenceGuard", "check_sampled_predictions", "describe_rates"]


def describe_rates(rates) -> str:
    """``inner_lr=...`` for a fixed rate, or the range of learned rates (an
    :class:`~reptile_gen.inner_loop.InnerLR` or a plain number), and the inner momentum
    if there is one."""
    text = _describe(rates)
    momentum = getattr(rates, "momentum", 0.0)
    return f"{text}, inner_momentum={momentum:g}" if momentum else text


def _describe(rates) -> str:
    if isinstance(rates, (int, float)):
        return f"inner_lr={float(rates):g}"
    learned = getattr(rates, "learned", "none")
    schedule = getattr(rates, "schedule", "constant")
    if schedule != "constant":  # a fixed factor per step multiplies the rates below
        schedule = list(schedule) if isinstance(schedule, tuple) else schedule
        return f"inner_lr_schedule={schedule} of " + _describe(_Unscheduled(rates))
    if learned == "none":
        return f"inner_lr={getattr(rates, 'init', float('nan')):g}"
    values = [
        torch.as_tensor(v).detach().reshape(-1).double() for v in rates.rates_by_name().values()
    ]
    flat = torch.cat(values) if values else torch.zeros(0)
    if flat.numel() == 0:
        return f"learned ({learned})"
    return f"learned ({learned}) in [{flat.min().item():g}, {flat.max().item():g}]"


class _Unscheduled:
    """An :class:`InnerLR` seen without its schedule (for :func:`describe_rates`)."""

    schedule = "constant"

    def __init__(self, rates) -> None:
        self.learned, self.init, self.rates_by_name = rates.learned, rates.init, rates.rates_by_name


def _first_bad(values: torch.Tensor) -> tuple[list[int], int | None, float]:
    """``(task indices, first inner step, first bad value)`` of a ``[B, T]`` tensor."""
    bad = ~torch.isfinite(values.detach())
    if values.dim() < 2:
        bad = bad.reshape(-1, 1)
        values = values.reshape(-1, 1)
    tasks = bad.any(dim=1).nonzero().reshape(-1).tolist()
    steps = bad.any(dim=0).nonzero().reshape(-1).tolist()
    first = steps[0] if steps else None
    value = values.detach()[bad][0].item() if bad.any() else math.nan
    return tasks, first, value


def _first_bad_loss(kept: list[tuple[str, torch.Tensor]]) -> tuple[str, str] | None:
    """``(what, detail)`` of the first non-finite entry of ``kept`` (``(what, losses)``
    pairs, inner losses ``[B, T]`` or a scalar), or None."""
    for what, losses in kept:
        if bool(torch.isfinite(losses).all()):
            continue
        tasks, step, value = _first_bad(losses)
        if losses.dim() >= 2:
            shown = tasks[:8] + (["..."] if len(tasks) > 8 else [])
            where = f"at inner step {step} " if losses.shape[1] > 1 else ""
            return what, f"{value} {where}of tasks {shown} (of this rank's meta-batch)"
        return what, f"value {value}"
    return None


class DivergenceGuard:
    """Collects the losses of a meta-step and raises the first non-finite one (or a
    non-finite meta-gradient) as :class:`Diverged` at :meth:`check_before_step`.

    The losses are kept (detached) until then and checked together with the
    meta-gradient in one pass, so a healthy step costs one finiteness test, not one per
    loss and parameter. ``enabled=False`` turns every check off (for a deliberate
    experiment with non-finite losses)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._losses: list[tuple[str, torch.Tensor]] = []

    def reset(self) -> None:
        self._losses = []

    def check_losses(self, what: str, losses: torch.Tensor | None, task_offset: int = 0) -> None:
        """Keep ``losses`` (inner losses ``[B, T]`` or a scalar meta-loss) for the test at
        :meth:`check_before_step`."""
        if self.enabled and losses is not None:
            self._losses.append((what, losses.detach()))

    def check_before_step(
        self, named_parameters: Iterable[tuple[str, torch.Tensor]], meta_step: int, rates
    ) -> None:
        """Raise :class:`Diverged` when this meta-step kept a non-finite loss or its
        meta-gradient (``.grad`` of the parameters) is non-finite; then start afresh."""
        if not self.enabled:
            return
        losses, self._losses = self._losses, []
        grads = [(n, p.grad) for n, p in named_parameters if p.grad is not None]
        flat = [t.reshape(-1) for _, t in losses] + [g.reshape(-1) for _, g in grads]
        if not flat or bool(torch.isfinite(torch.cat(flat)).all()):
            return
        problem = _first_bad_loss(losses)
        if problem is None:
            names = [n for n, g in grads if not bool(torch.isfinite(g).all())]
            problem = ("meta-gradient", f"in {', '.join(names[:4])}")
        raise Diverged(problem[0], meta_step, problem[1], describe_rates(rates))


def check_sampled_predictions(logits: torch.Tensor, mask: torch.Tensor, start: int, rates) -> None:
    """Raise :class:`Diverged` when a sampler's predictions ``[N, k, C]`` for the elements
    ``start...`` (``mask [N, k]``: the real ones) are non-finite: the replayed inner SGD of
    some samples has diverged, and what it would draw next is noise."""
    bad = (~torch.isfinite(logits.detach())).any(-1) & mask
    if not bool(bad.any()):
        return
    samples = bad.any(1).nonzero().reshape(-1).tolist()
    element = start + int(bad.any(0).nonzero()[0])
    shown = samples[:8] + (["..."] if len(samples) > 8 else [])
    raise Diverged(
        "prediction while sampling",
        None,
        f"at element {element} of samples {shown}",
        describe_rates(rates),
    )
