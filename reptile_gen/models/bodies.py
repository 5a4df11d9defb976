"""Architectures (``model=``): plain ``nn.Module`` bodies mapping ``in_features`` to
``out_features``. No BatchNorm (per-task statistics would leak across the inner loop),
no task-specific code: the task supplies the encoder, head size and loss."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["MLP", "GatedMLP", "LSTMBlockStack", "Siren", "LayerNorm", "ACTIVATIONS"]

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}


def _check_sizes(hidden_sizes) -> list[int]:
    sizes = [int(h) for h in hidden_sizes]
    if not sizes or any(h < 1 for h in sizes):
        raise ValueError(
            f"model.body.hidden_sizes={list(hidden_sizes)}: need one or more sizes >= 1"
        )
    return sizes


class MLP(nn.Module):
    """Fully connected layers with a configurable activation (``relu`` or ``tanh``...).

    The MAML sine study uses ``hidden_sizes=[40, 40]`` with ReLU.
    """

    def __init__(self, in_features: int, hidden_sizes=(40, 40), activation: str = "relu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"model.activation={activation!r}; allowed: {', '.join(ACTIVATIONS)}")
        layers: list[nn.Module] = []
        width = in_features
        for h in _check_sizes(hidden_sizes):
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            width = h
        self.net = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GatedLinear(nn.Module):
    """``tanh(W_a x + b_a) * sigmoid(W_g x + b_g)``: the gate lets the network shield
    parameters from each inner SGD step (reptile-gen's gated MLP)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, 2 * out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.linear(x).chunk(2, dim=-1)
        return torch.tanh(value) * torch.sigmoid(gate)


class GatedMLP(nn.Module):
    """A stack of :class:`GatedLinear` layers."""

    def __init__(self, in_features: int, hidden_sizes=(40, 40)) -> None:
        super().__init__()
        layers = []
        width = in_features
        for h in _check_sizes(hidden_sizes):
            layers.append(GatedLinear(width, h))
            width = h
        self.net = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` written with elementary ops (same parameters, init, state dict).

    The fused kernel's ``vmap`` batching rule for its backward gives wrong second-order
    gradients with an affine LayerNorm (pytorch/functorch#534): exactly what the
    functional engine computes for second-order MAML. The composite form is correct.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(-len(self.normalized_shape), 0))
        centered = x - x.mean(dims, keepdim=True)
        out = centered * torch.rsqrt(centered.pow(2).mean(dims, keepdim=True) + self.eps)
        if self.weight is not None:
            out = out * self.weight
        if self.bias is not None:
            out = out + self.bias
        return out


class LSTMBlock(nn.Module):
    """An LSTM cell with no recurrence: its previous hidden and cell state are trainable
    parameters (``h0``, ``c0``) rather than the output of an earlier step (reptile-gen)."""

    def __init__(self, in_features: int, hidden: int, layer_norm: bool = False) -> None:
        super().__init__()
        self.input_to_gates = nn.Linear(in_features, 4 * hidden)
        self.state_to_gates = nn.Linear(hidden, 4 * hidden, bias=False)
        self.h0 = nn.Parameter(torch.zeros(hidden))
        self.c0 = nn.Parameter(torch.zeros(hidden))
        self.norm = LayerNorm(hidden) if layer_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = self.input_to_gates(x) + self.state_to_gates(self.h0)
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * self.c0 + torch.sigmoid(i) * torch.tanh(g)
        return self.norm(torch.sigmoid(o) * torch.tanh(c))


class LSTMBlockStack(nn.Module):
    """Optional linear input layer (with LayerNorm), then :class:`LSTMBlock` layers."""

    def __init__(
        self,
        in_features: int,
        hidden_sizes=(40, 40),
        input_layer: int | None = None,
        layer_norm: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        if input_layer:
            layers += [nn.Linear(width, input_layer)]
            if layer_norm:
                layers.append(LayerNorm(input_layer))
            width = input_layer
        for h in _check_sizes(hidden_sizes):
            layers.append(LSTMBlock(width, h, layer_norm=layer_norm))
            width = h
        self.net = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SineLayer(nn.Module):
    """``sin(w0 * (W x + b))`` with the SIREN initialisation (Sitzmann et al., 2020)."""

    def __init__(self, in_features: int, out_features: int, w0: float, first: bool) -> None:
        super().__init__()
        self.w0 = w0
        self.linear = nn.Linear(in_features, out_features)
        bound = 1.0 / in_features if first else math.sqrt(6.0 / in_features) / w0
        with torch.no_grad():
            self.linear.weight.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.w0 * self.linear(x))


class Siren(nn.Module):
    """Sinusoidal representation network: a stack of :class:`SineLayer`."""

    def __init__(
        self, in_features: int, hidden_sizes=(40, 40), w0: float = 1.0, w0_initial: float = 30.0
    ) -> None:
        super().__init__()
        layers = []
        width = in_features
        for i, h in enumerate(_check_sizes(hidden_sizes)):
            layers.append(SineLayer(width, h, w0_initial if i == 0 else w0, first=i == 0))
            width = h
        self.net = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
