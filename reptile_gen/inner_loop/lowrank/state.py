"""The small pieces of a low-rank run: a step, the differentiated tensors, padding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import vmap

from reptile_gen.inner_loop.core import sgd_step

__all__ = ["Env", "Step", "pad_tasks", "pad_to", "scale_rows", "step_losses", "update_prefix"]


@dataclass(frozen=True)
class Step:
    start: int  # first element (in the padded support)
    count: int  # real elements of the schedule's slice
    record: bool  # its pre-update losses are the elements' online losses
    first_order: bool  # its inner gradients are constants


class Env:
    """The tensors a run differentiates with respect to: the shared initial weights of
    the low-rank layers, and the learned inner rates (floats when fixed).

    Rates that change along the loop (``RateSlots.steps``): the rate of step ``i``
    multiplies that step's history rows ``D`` when they are written (:meth:`at`), so
    every reader of the history (the hooks' correction, the dense fold, the adapted
    weights) sums rows that already carry their step's rate. A fixed schedule puts its
    factor ``f_i`` in the rows and keeps the base rate (fixed or learned ``scalar`` /
    ``per_tensor``) as the site's rate (:attr:`site_rates`); a learned per-step rate
    puts the whole rate ``r_i`` in the rows, with the graph to ``r_i`` that a row carries,
    and the site's rate is 1. A per-unit rate (``per_unit``, one per row of the weight)
    goes into the rows the same way, each row's output entries times their unit's rate
    (an embedding's row: the rate of the table row it looked up, :func:`scale_rows`).
    """

    def __init__(self, weights: list[torch.Tensor], rate_tensors: list[torch.Tensor], run):
        self.weights = weights
        self.rate_tensors = rate_tensors
        self.slots = slots = run.rate_slots
        self.site_names, self.small_names = run.site_names, run.small_names
        per_unit = any(
            torch.is_tensor(r) and r.dim() > 0
            for r in (slots.rate(n, rate_tensors) for n in run.site_names)
        )
        self.rows_hold_rates = per_unit or (
            slots.steps is not None and slots.steps.buckets is not None
        )
        if self.rows_hold_rates:
            self.site_rates = [1.0] * len(run.site_names)
        else:
            self.site_rates = [slots.rate(n, rate_tensors) for n in run.site_names]
        self.small_rates = [slots.rate(n, rate_tensors) for n in run.small_names]

    def at(self, step: int) -> tuple[list, list]:
        """``(row scales, small rates)`` of step ``step``: per site, what multiplies the
        step's history rows ``D`` (None: nothing), and per small parameter its rate."""
        steps = self.slots.steps
        if steps is None and not self.rows_hold_rates:
            return [None] * len(self.site_names), self.small_rates
        rates = self.slots.rates(self.rate_tensors, step)
        small = [rates[n] for n in self.small_names]
        if self.rows_hold_rates:
            return [rates[n] for n in self.site_names], small
        f = steps.factors[step]
        return [None if f == 1.0 else f] * len(self.site_names), small


def scale_rows(d: torch.Tensor, scale, site=None, a: torch.Tensor | None = None) -> torch.Tensor:
    """History rows ``d`` (``[B, r, out]``) times their step's ``scale`` (None:
    unchanged): a number, or a per-unit rate of the ``site``'s weight (one per row of the
    weight, :func:`~reptile_gen.inner_loop.core.rates.unit_shape`): a linear layer's
    ``(out, 1)`` scales each output entry of a row; an embedding table's ``(num, 1)``
    scales each row by the rate of the table row it looked up (its index in ``a``)."""
    if scale is None:
        return d
    if torch.is_tensor(scale) and scale.dim() > 0:
        scale = scale.reshape(-1)
        scale = scale[a].unsqueeze(-1) if site.embedding else scale
    return d * scale


def pad_tasks(t: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """``t`` (``[k, ...]``, the active tasks) with zero rows for the idle tasks after it."""
    missing = num_tasks - t.shape[0]
    return t if missing <= 0 else torch.cat([t, t.new_zeros(missing, *t.shape[1:])])


def update_prefix(p: torch.Tensor, g: torch.Tensor, rate, n: int) -> torch.Tensor:
    """``p`` with the SGD step ``rate * g`` taken by its first ``n`` tasks (out of place)."""
    if n == p.shape[0]:
        return sgd_step(p, g, rate)
    return torch.cat([sgd_step(p[:n], g, rate), p[n:]])


def pad_to(t: torch.Tensor, length: int) -> torch.Tensor:
    """``t`` (``[B, S, ...]``) zero-padded along dim 1 to ``length`` (zeros are valid
    inputs of every encoder and targets of every loss; the mask pads with False)."""
    missing = length - t.shape[1]
    if missing <= 0:
        return t
    return torch.cat([t, t.new_zeros((t.shape[0], missing, *t.shape[2:]))], 1)


def step_losses(loss_fn, out: torch.Tensor, y: torch.Tensor, m: torch.Tensor):
    """``(losses [B], elements [B, k])`` of one step from the tasks' model outputs ``out``:
    each element's loss (``loss_fn`` per task) times the mask ``m``, and each task's step
    loss, their mean over its real elements (0 when it has none: a padded step neither
    adds loss nor moves the parameters)."""
    elements = vmap(loss_fn)(out, y)
    mask = m.to(elements.dtype)
    dims = tuple(range(1, elements.dim()))
    weighted = elements * mask
    if not dims:
        return weighted / mask.clamp(min=1.0), weighted
    return weighted.sum(dims) / mask.sum(dims).clamp(min=1.0), weighted
