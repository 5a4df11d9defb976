"""The pieces of the compiled few-shot meta-step (:mod:`.compiled`), over flat tensors:
the MLP's forward, its backward, the R-operator pass and the activations' derivatives."""

from __future__ import annotations

import math

import torch
from torch import nn

from reptile_gen.inner_loop.core.activations import activation_second, silu_derivative

__all__ = [
    "act",
    "act_d1",
    "act_d2",
    "backward",
    "input_grad",
    "forward",
    "linear",
    "outer",
    "rpass",
]


def act(kind: type, z: torch.Tensor) -> torch.Tensor:
    if kind is nn.ReLU:
        return torch.relu(z)
    if kind is nn.Tanh:
        return torch.tanh(z)
    if kind is nn.GELU:
        return torch.nn.functional.gelu(z)
    return torch.nn.functional.silu(z)


def act_d1(kind: type, z: torch.Tensor) -> torch.Tensor:
    """The activation's derivative at ``z``."""
    if kind is nn.ReLU:
        return (z > 0).to(z.dtype)
    if kind is nn.Tanh:
        t = torch.tanh(z)
        return 1 - t * t
    if kind is nn.GELU:  # Phi(z) + z phi(z)
        phi = torch.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi))
        return 0.5 * (1 + torch.erf(z * (1 / math.sqrt(2)))) + z * phi
    return silu_derivative(z)


def act_d2(kind: type, z: torch.Tensor) -> torch.Tensor | None:
    """The activation's second derivative at ``z`` (None: zero, ReLU)."""
    if kind is nn.ReLU:
        return None
    return activation_second(kind, torch.tanh(z) if kind is nn.Tanh else z)


def linear(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``h @ w.T + b`` per task: ``h`` is ``[B, N, in]``, ``w`` ``[out, in]`` (shared by the
    tasks) or ``[B, out, in]``, ``b`` ``[out]`` or ``[B, out]``. A width-1 side is a
    broadcast product (fused with the rest), a shared weight one ``mm`` for all tasks."""
    if w.shape[-1] == 1:  # one input
        out = h * w.transpose(-1, -2).unsqueeze(0) if w.dim() == 2 else h * w.transpose(1, 2)
    elif w.shape[-2] == 1:  # one output
        out = (h * (w.unsqueeze(0) if w.dim() == 2 else w)).sum(-1, keepdim=True)
    elif w.dim() == 2:
        out = torch.matmul(h, w.t())
    else:
        return (
            torch.bmm(h, w.transpose(1, 2))
            if b is None
            else torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
        )
    if b is None:
        return out
    return out + (b if b.dim() == 1 else b.unsqueeze(1))


def input_grad(d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``d @ w`` per task (the input gradient of a layer with weight ``w``)."""
    if w.shape[-2] == 1:  # one output
        return d * (w.unsqueeze(0) if w.dim() == 2 else w)
    if w.shape[-1] == 1:  # one input
        wt = w.transpose(-1, -2)
        return (d * (wt.unsqueeze(0) if w.dim() == 2 else wt)).sum(-1, keepdim=True)
    return torch.matmul(d, w) if w.dim() == 2 else torch.bmm(d, w)


def outer(d: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``d[b].T @ h[b]`` (``[B, out, in]``: a weight gradient)."""
    if d.shape[-1] == 1 or h.shape[-1] == 1:
        return (d.unsqueeze(-1) * h.unsqueeze(-2)).sum(1)
    return torch.bmm(d.transpose(1, 2), h)


def forward(params, x, acts):
    """Prediction, each layer's input and each hidden layer's pre-activation."""
    inputs, pre = [x], []
    h = x
    last = len(acts)
    for i in range(last + 1):
        z = linear(h, params[2 * i], params[2 * i + 1])
        if i == last:
            return z, inputs, pre
        pre.append(z)
        h = act(acts[i], z)
        inputs.append(h)
    raise AssertionError("unreachable")


def backward(params, acts, d, inputs, pre):
    """Parameter gradients per task for output gradient ``d``; also each layer's output
    gradient (``deltas``) and the input gradient of each layer above the first before
    the activation's derivative (``back``: the R-pass's second-derivative term)."""
    n = len(acts) + 1
    grads: list = [None] * (2 * n)
    deltas: list = [None] * n
    back: list = [None] * n
    for i in reversed(range(n)):
        deltas[i] = d
        grads[2 * i] = outer(d, inputs[i])
        grads[2 * i + 1] = d.sum(1)
        if i > 0:
            e = input_grad(d, params[2 * i])
            back[i] = e
            d = e * act_d1(acts[i - 1], pre[i - 1])
    return grads, deltas, back


def rpass(params, acts, v, inputs, pre, deltas, back, rd_of):
    """``H v + B(seed)`` per parameter: the tangent forward pass of ``v`` gives R{pred},
    ``rd_of(R{pred})`` the output seed (curvature term plus the first-order seed), then
    the tangent of the backward pass."""
    n = len(acts) + 1
    rpre: list = []  # R{pre-activation} of each hidden layer
    rin: list = [None]  # R{input} of each layer
    rz = linear(inputs[0], v[0], v[1])
    for i in range(1, n):
        rpre.append(rz)
        rin.append(rz * act_d1(acts[i - 1], pre[i - 1]))
        rz = linear(inputs[i], v[2 * i], v[2 * i + 1]) + linear(rin[i], params[2 * i])
    rd = rd_of(rz)
    out: list = [None] * (2 * n)
    for i in reversed(range(n)):
        out[2 * i + 1] = rd.sum(1)
        out[2 * i] = outer(rd, inputs[i])
        if i == 0:
            break
        out[2 * i] = out[2 * i] + outer(deltas[i], rin[i])
        z = pre[i - 1]
        rd = (input_grad(rd, params[2 * i]) + input_grad(deltas[i], v[2 * i])) * act_d1(
            acts[i - 1], z
        )
        d2 = act_d2(acts[i - 1], z)
        if d2 is not None:
            rd = rd + back[i] * d2 * rpre[i - 1]
    return out
