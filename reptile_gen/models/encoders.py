"""Input encoders chosen by the task spec: identity for continuous features, embeddings
for discrete coordinates (character position, pixel row/column)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ContinuousEncoder", "DiscreteEncoder", "make_encoder"]


class ContinuousEncoder(nn.Module):
    """Passes real-valued features through unchanged (``[..., dim]``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class DiscreteEncoder(nn.Module):
    """One embedding table per integer coordinate, concatenated.

    ``x`` is ``[..., len(sizes)]`` long (or ``[...]`` for a single coordinate).
    """

    def __init__(self, sizes: tuple[int, ...], embedding_dim: int) -> None:
        super().__init__()
        self.sizes = tuple(int(s) for s in sizes)
        self.tables = nn.ModuleList(nn.Embedding(s, embedding_dim) for s in self.sizes)
        for table in self.tables:
            nn.init.normal_(table.weight, std=1.0)
        self.out_features = embedding_dim * len(self.sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != len(self.sizes):
            x = x.unsqueeze(-1)
        x = x.long()
        return torch.cat([table(x[..., i]) for i, table in enumerate(self.tables)], dim=-1)


def make_encoder(spec, embedding_dim: int) -> nn.Module:
    """The encoder a :class:`~reptile_gen.data.TaskSpec` asks for."""
    if spec.input_kind == "continuous":
        return ContinuousEncoder(spec.input_dim)
    return DiscreteEncoder(spec.encoder_sizes, embedding_dim)
