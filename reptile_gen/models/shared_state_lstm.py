"""The MNIST body of the original reptile-gen (``model=original_mnist``).

A linear layer with LayerNorm, then blocks of an LSTM cell without recurrence whose one
trainable state vector ``s`` is both the previous hidden vector and the previous cell
state. Each block has four gate layers on ``[s, x]`` (``2 d -> d``):

    f, i, o = sigmoid(W_f [s, x]), sigmoid(W_i [s, x]), sigmoid(W_o [s, x])
    c = i * tanh(W_u [s, x]) + f * s
    out = o * c                      (no tanh on the new cell)

followed by LayerNorm. With the original's sizes (embeddings 2 x 128, width 256, two blocks)
that is eight 512 -> 256 gate layers. :class:`~reptile_gen.models.LSTMBlockStack` is a
different function (separate ``h0``/``c0``, ``tanh`` on the cell, fused gate layers).
"""

from __future__ import annotations

import torch
from torch import nn

from reptile_gen.models.bodies import LayerNorm

__all__ = ["SharedStateLSTMBlock", "SharedStateLSTMStack"]


class SharedStateLSTMBlock(nn.Module):
    """One block: four ``Linear(2 d, d)`` gates on ``[state, x]``; the state vector is a
    trainable parameter of width ``d`` (initialised N(0, 1), as in the original)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        if int(width) < 1:
            raise ValueError(f"model.body.width={width}: need an integer >= 1")
        width = int(width)
        self.state = nn.Parameter(torch.randn(width))
        self.forget_gate = nn.Linear(2 * width, width)
        self.input_gate = nn.Linear(2 * width, width)
        self.output_gate = nn.Linear(2 * width, width)
        self.update = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.state.expand(*x.shape[:-1], self.state.shape[0])
        joined = torch.cat([state, x], dim=-1)
        forget = torch.sigmoid(self.forget_gate(joined))
        inputs = torch.sigmoid(self.input_gate(joined))
        outputs = torch.sigmoid(self.output_gate(joined))
        cell = inputs * torch.tanh(self.update(joined)) + forget * state
        return outputs * cell


class SharedStateLSTMStack(nn.Module):
    """``Linear(in, width)`` + LayerNorm, then ``num_blocks`` x (block + LayerNorm)."""

    def __init__(self, in_features: int, width: int = 256, num_blocks: int = 2) -> None:
        super().__init__()
        if int(num_blocks) < 1:
            raise ValueError(f"model.body.num_blocks={num_blocks}: need an integer >= 1")
        if int(width) < 1:
            raise ValueError(f"model.body.width={width}: need an integer >= 1")
        width = int(width)
        layers: list[nn.Module] = [nn.Linear(in_features, width), LayerNorm(width)]
        for _ in range(int(num_blocks)):
            layers += [SharedStateLSTMBlock(width), LayerNorm(width)]
        self.net = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
