"""The small pieces of a low-rank run: a step, the differentiated tensors, padding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reptile_gen.inner_loop.core import sgd_step

__all__ = ["Env", "Step", "pad_tasks", "pad_to", "update_prefix"]


@dataclass(frozen=True)
class Step:
    start: int  # first element (in the padded support)
    count: int  # real elements of the schedule's slice
    record: bool  # its pre-update losses are the elements' online losses
    first_order: bool  # its inner gradients are constants


class Env:
    """The tensors a run differentiates with respect to: the shared initial weights of
    the low-rank layers, and the learned inner rates (floats when fixed)."""

    def __init__(self, weights: list[torch.Tensor], rate_tensors: list[torch.Tensor], run):
        self.weights = weights
        self.rate_tensors = rate_tensors
        self.site_rates = [run.rate(n, rate_tensors) for n in run.site_names]
        self.small_rates = [run.rate(n, rate_tensors) for n in run.small_names]


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
