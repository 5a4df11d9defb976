"""The small interface every inner-loop engine implements."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from reptile_gen.data.task_batch import TaskBatch
from reptile_gen.inner_loop.schedule import InnerLR, InnerSchedule

__all__ = ["InnerLoopEngine", "InnerLoopResult", "masked_mean", "LossFn"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class InnerLoopResult:
    """What an inner loop over a meta-batch returns (leading dimension: tasks).

    Attributes:
        step_losses: ``[B, T]`` the loss each inner step descended (masked mean over the
            step's elements), taken before that step's update.
        element_losses: ``[B, S]`` each support element's loss before the model had
            trained on it (0 on padding). Summed, this is the online negative
            log-likelihood of the sequence.
        query_losses: ``[B, T+1]`` query loss after 0..T steps if requested, else
            ``[B, 1]`` after all steps; None without a query set.
        adapted: the adapted parameters ``{name: [B, ...]}`` if requested.
        adapted_mean: their task-mean ``{name: [...]}``, filled instead of ``adapted`` by
            an engine that computes it directly (``return_adapted="mean"``: the low-rank
            engine, in one GEMM per layer, without a per-task copy of each weight).
        mean_final_query_loss: the task-mean of the final query loss as its own output
            with a direct backward (the compiled meta-step: its gradient is the task-mean
            meta-gradient it already holds), or None; see :meth:`query_objective`.
    """

    step_losses: torch.Tensor
    element_losses: torch.Tensor
    query_losses: torch.Tensor | None = None
    adapted: dict[str, torch.Tensor] | None = None
    adapted_mean: dict[str, torch.Tensor] | None = None
    mean_final_query_loss: torch.Tensor | None = None

    def query_objective(self) -> torch.Tensor:
        """The task-mean of the final query loss (MAML's meta-objective)."""
        if self.mean_final_query_loss is not None:
            return self.mean_final_query_loss
        return self.final_query_loss.mean()

    @property
    def final_query_loss(self) -> torch.Tensor:
        """``[B]`` query loss after the last inner step."""
        if self.query_losses is None:
            raise ValueError("this inner loop ran without a query set")
        return self.query_losses[:, -1]

    def mean_adapted(self) -> dict[str, torch.Tensor]:
        """Task-mean of the adapted parameters (what Reptile moves toward): the engine's
        own ``adapted_mean`` if it made one, else the mean of ``adapted``."""
        if self.adapted_mean is not None:
            return self.adapted_mean
        if self.adapted is None:
            raise ValueError("this inner loop ran without return_adapted")
        return {name: phi.mean(0) for name, phi in self.adapted.items()}


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the True entries of ``mask`` (0 when all are masked, so a
    step made only of padding neither adds loss nor moves the parameters)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


class InnerLoopEngine:
    """Runs each task's inner SGD over its support set for a whole meta-batch.

    Subclasses implement :meth:`run`. ``grad_mode`` says what flows back to the initial
    parameters (and learned inner learning rates):

    * ``second_order``: the full unrolled meta-gradient (MAML);
    * ``first_order``: inner gradients treated as constants (first-order MAML), so
      ``d theta_t / d theta_0 = I``;
    * ``none``: no graph at all (Reptile, evaluation).
    """

    name = "base"

    def run(
        self,
        model: nn.Module,
        batch: TaskBatch,
        loss_fn: LossFn,
        lr: InnerLR,
        schedule: InnerSchedule,
        grad_mode: str,
        *,
        track_query: bool = False,
        return_adapted: bool | str = False,
    ) -> InnerLoopResult:
        """Adapt every task of ``batch``. ``return_adapted``: ``True`` for the adapted
        parameters per task; ``"mean"`` when only their task-mean is needed (an engine
        may then fill ``adapted_mean`` only; engines that do not treat it as ``True``)."""
        raise NotImplementedError


def first_visit(slices: list[tuple[int, int]]) -> list[bool]:
    """For each step, whether it is the first to visit its elements (its pre-update losses
    are then those elements' online losses)."""
    frontier, out = 0, []
    for start, end in slices:
        out.append(start >= frontier and end > start)
        frontier = max(frontier, end)
    return out


def last_active_step(mask: torch.Tensor, slices: list[tuple[int, int]]) -> torch.Tensor:
    """``[B]`` index of each task's last step with a real (unmasked) element, -1 if none.
    A step whose elements are all padding is a no-op for the task (zero loss, zero
    gradient), so nothing needs to run for it."""
    if not slices:
        return torch.full(mask.shape[:1], -1, dtype=torch.long, device=mask.device)
    # real elements before each position; a slice is active if the count grows over it
    count = torch.nn.functional.pad(mask.long().cumsum(1), (1, 0))
    length = mask.shape[1]
    starts = torch.tensor([min(s, length) for s, _ in slices], device=mask.device)
    ends = torch.tensor([min(max(s, e), length) for s, e in slices], device=mask.device)
    active = count[:, ends] > count[:, starts]  # [B, T]
    index = torch.arange(len(slices), device=mask.device)
    return torch.where(active, index, -1).amax(1)
