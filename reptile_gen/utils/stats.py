"""Summary statistics reported in ``metrics.json``."""

from __future__ import annotations

import math

import torch

__all__ = ["mean_and_ci95"]


def mean_and_ci95(values: torch.Tensor) -> tuple[float, float]:
    """Mean over the first dimension and the half-width of its normal 95% confidence
    interval (1.96 standard errors)."""
    values = values.detach().double().flatten()
    n = values.numel()
    if n == 0:
        return math.nan, math.nan
    mean = values.mean().item()
    if n == 1:
        return mean, 0.0
    return mean, 1.96 * values.std(unbiased=True).item() / math.sqrt(n)
