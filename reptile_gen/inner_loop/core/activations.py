"""Derivatives of the elementwise activations that the hand-written passes need
(the batched layers' reverse pass and the compiled program)."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["activation_second", "silu_derivative"]


def silu_derivative(z: torch.Tensor) -> torch.Tensor:
    """``d/dz z sigmoid(z) = s (1 + z (1 - s))`` (aten's silu_backward has no derivative)."""
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def activation_second(kind: type, saved: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``sigma''(z)`` of a Tanh, SiLU or GELU (``kind``: the module class), from the
    activation's output for tanh and its input ``z`` otherwise."""
    if kind is nn.Tanh:  # d/dz (1 - t^2) = -2 t (1 - t^2)
        return -2 * saved * (1 - saved * saved)
    z = saved
    if kind is nn.SiLU:  # s (1 - s) (2 + z (1 - 2 s))
        s = torch.sigmoid(z)
        return s * (1 - s) * (2 + z * (1 - 2 * s))
    if approximate == "tanh":
        # 0.5 z (1 + t), t = tanh(u), u = c (z + k z^3):
        # (1 - t^2) u' + 0.5 z (1 - t^2) (u'' - 2 t u'^2)
        c, k = math.sqrt(2 / math.pi), 0.044715
        t = torch.tanh(c * (z + k * z**3))
        du = c * (1 + 3 * k * z * z)
        ddu = c * 6 * k * z
        sech2 = 1 - t * t
        return sech2 * du + 0.5 * z * sech2 * (ddu - 2 * t * du * du)
    # exact GELU z Phi(z): phi(z) (2 - z^2)
    phi = torch.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi))
    return phi * (2 - z * z)
