"""An autoregressive LSTM network: the network of the LSTM baseline (``algorithm=lstm``).

Unlike the ``model=`` networks, which map one element's input to its prediction and are
adapted by SGD along a sequence, this network conditions on the past with a recurrent
state, so it takes the previous targets as an input.
"""

from __future__ import annotations

import torch
from torch import nn

from reptile_gen.data.task_spec import TaskSpec
from reptile_gen.models.encoders import make_encoder

__all__ = ["LSTMNetwork", "LSTMState"]

LSTMState = tuple[torch.Tensor, torch.Tensor]


class LSTMNetwork(nn.Module):
    """``head(LSTM(concat(encoder(x_i), embedding(y_{i-1}))))``.

    Previous targets are embedded as tokens: ``{0, 1, start}`` for bits, ``num_classes
    + 1`` values for classes; the start token is the last index
    (:attr:`TaskSpec.start_token <reptile_gen.data.TaskSpec.start_token>`).

    Args:
        task_spec: a sequence task with ``bits`` or ``classes`` outputs.
        hidden_size: LSTM state width.
        num_layers: stacked LSTM layers.
        embedding_dim: width of each input-coordinate embedding (discrete inputs) and of
            the previous-target embedding.
        dropout: dropout between LSTM layers (training only).
    """

    def __init__(
        self,
        task_spec: TaskSpec,
        hidden_size: int = 256,
        num_layers: int = 2,
        embedding_dim: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if task_spec.output_kind not in ("bits", "classes"):
            raise ValueError(
                f"LSTMNetwork needs bits or classes targets to feed back; got output_kind="
                f"{task_spec.output_kind!r}"
            )
        self.task_spec = task_spec
        self.start_token = task_spec.start_token
        num_tokens = self.start_token + 1
        self.encoder = make_encoder(task_spec, embedding_dim)
        self.prev_embedding = nn.Embedding(num_tokens, embedding_dim)
        self.body = nn.LSTM(
            self.encoder.out_features + embedding_dim,
            hidden_size,
            num_layers=num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.head = nn.Linear(hidden_size, task_spec.head_features)

    def previous_tokens(self, y: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` long: the start token, then ``y_0 .. y_{T-2}`` (teacher forcing)."""
        return self.task_spec.previous_targets(y)

    def forward(
        self, x: torch.Tensor, prev: torch.Tensor, state: LSTMState | None = None
    ) -> tuple[torch.Tensor, LSTMState]:
        """Predictions ``[B, T, head_features]`` for inputs ``x [B, T, ...]`` given the
        previous targets ``prev [B, T]`` (long tokens) and the state before position 0
        (``None``: zeros); returns the state after the last position too, so a sequence
        can be run one position at a time."""
        if x.dim() == prev.dim():  # one coordinate per element: [B, T] -> [B, T, 1]
            x = x.unsqueeze(-1)
        inputs = torch.cat([self.encoder(x), self.prev_embedding(prev.long())], dim=-1)
        hidden, state = self.body(inputs, state)
        return self.head(hidden), state
