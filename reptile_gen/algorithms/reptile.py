"""Reptile (Nichol, Achiam & Schulman, 2018)."""

from __future__ import annotations

import torch

from reptile_gen.algorithms.base import MetaLearner
from reptile_gen.data.task_batch import TaskBatch

__all__ = ["Reptile", "linear_decay"]


class Reptile(MetaLearner):
    """Reptile: run each task's inner SGD with no graph, then move the initial weights
    toward the mean of the adapted ones.

    The meta-gradient ``theta - mean_b(phi_b)`` is produced as the gradient of the
    surrogate ``0.5 * ||theta - stopgrad(mean_b phi_b)||^2``, so it goes through
    Lightning's ordinary backward: DDP averages it across ranks, gradient clipping and LR
    schedulers apply. With outer SGD of learning rate ``epsilon`` one step is exactly
    ``theta <- theta + epsilon * (mean phi - theta)`` (the paper's batched update; anneal
    ``epsilon`` linearly with :func:`linear_decay`). Outer Adam works too (as the
    original reptile-gen used).

    Reptile gives inner learning rates no gradient: learning them is a config error.
    """

    display_name = "Reptile"
    family = "reptile"
    grad_mode = "none"
    learns_inner_lr = False

    def meta_loss(self, batch: TaskBatch):
        # only the task-mean of the adapted weights is needed: an engine may compute it
        # without a per-task copy of each weight (the low-rank engine: one GEMM per layer)
        result = self.adapt(batch, "none", return_adapted="mean")
        targets = result.mean_adapted()
        loss = torch.zeros((), device=batch.support_x.device)
        for name, theta in self.model.named_parameters():
            target = targets[name].detach()
            loss = loss + 0.5 * (theta - target).pow(2).sum()
        logs = {"support_loss_pre": result.step_losses[:, 0].mean().detach()}
        if self.objective == "online":
            logs["online_loss"] = self.objective_loss(result, batch).detach()
        elif batch.has_query:
            logs["query_loss"] = result.final_query_loss.mean().detach()
        return loss, logs


def linear_decay(
    optimizer: torch.optim.Optimizer, total_steps: int, final_fraction: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear annealing of the outer step size from its initial value to
    ``final_fraction`` of it over ``total_steps`` meta-steps (Reptile paper)."""
    total = max(int(total_steps), 1)

    def factor(step: int) -> float:
        frac = min(step / total, 1.0)
        return 1.0 - (1.0 - final_fraction) * frac

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
