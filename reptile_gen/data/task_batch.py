"""The one structure that crosses the data/algorithm boundary: a meta-batch of tasks."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

__all__ = ["TaskBatch"]


@dataclass
class TaskBatch:
    """A meta-batch of ``B`` tasks as tensors with a leading task dimension.

    Attributes:
        support_x: ``[B, S, ...]`` inputs the inner loop adapts on (in order).
        support_y: ``[B, S, ...]`` targets of the support set.
        support_mask: ``[B, S]`` bool, False on padding (variable-length sequences).
        query_x: optional ``[B, Q, ...]`` inputs scored after adaptation.
        query_y: optional ``[B, Q, ...]`` targets of the query set.
        info: optional ``[B, k]`` float tensor of per-task metadata (e.g. sine amplitude
            and phase) used only for plots; never by the algorithms.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    support_mask: torch.Tensor | None = None
    query_x: torch.Tensor | None = None
    query_y: torch.Tensor | None = None
    info: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.support_mask is None:
            self.support_mask = torch.ones(
                self.support_x.shape[:2], dtype=torch.bool, device=self.support_x.device
            )

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    @property
    def has_query(self) -> bool:
        return self.query_x is not None

    def to(self, device: torch.device | str) -> TaskBatch:
        return TaskBatch(
            **{
                f.name: (
                    None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                )
                for f in fields(self)
            }
        )

    def map(self, fn) -> TaskBatch:
        """Apply ``fn`` to every tensor field (e.g. a dtype cast or a task slice)."""
        return TaskBatch(
            **{
                f.name: (None if getattr(self, f.name) is None else fn(getattr(self, f.name)))
                for f in fields(self)
            }
        )

    def __getitem__(self, index) -> TaskBatch:
        """Tasks ``index`` (an int keeps a task dimension of 1; slices and index tensors work)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self.map(lambda t: t[index])
