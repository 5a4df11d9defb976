"""Models: an input encoder chosen by the task, a body chosen by ``model=``, a linear head
sized by the task. Plain ``nn.Module``s; the inner-loop engines batch them over tasks."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from reptile_gen.models.bodies import MLP, GatedMLP, LSTMBlockStack, Siren
from reptile_gen.models.encoders import ContinuousEncoder, DiscreteEncoder, make_encoder
from reptile_gen.models.lstm import LSTMNetwork

__all__ = [
    "MLP",
    "GatedMLP",
    "LSTMBlockStack",
    "Siren",
    "ContinuousEncoder",
    "DiscreteEncoder",
    "LSTMNetwork",
    "SequenceModel",
    "build_model",
]


class SequenceModel(nn.Module):
    """``head(body(encoder(x)))``: maps one element's input to its prediction."""

    def __init__(self, encoder: nn.Module, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.encoder(x)))


def build_model(spec, body: Callable[..., nn.Module], embedding_dim: int = 64) -> SequenceModel:
    """Assemble the model for a task.

    Args:
        spec: the task's :class:`~reptile_gen.data.TaskSpec`.
        body: a callable (a Hydra ``_partial_``) taking ``in_features``.
        embedding_dim: width of each coordinate embedding for discrete inputs.
    """
    encoder = make_encoder(spec, embedding_dim)
    trunk = body(in_features=encoder.out_features)
    head = nn.Linear(trunk.out_features, spec.head_features)
    return SequenceModel(encoder, trunk, head)
