"""MAML (Finn et al., 2017) and its first-order approximation."""

from __future__ import annotations

from reptile_gen.algorithms.base import MetaLearner
from reptile_gen.data.task_batch import TaskBatch

__all__ = ["MAML", "FOMAML"]


class MAML(MetaLearner):
    """Second-order MAML: backpropagate the meta-objective through the whole inner loop.

    With ``first_order=True`` the inner gradients are treated as constants (first-order
    MAML): the meta-gradient is the objective's gradient at the adapted parameters.
    Learned inner learning rates (Meta-SGD, Li et al. 2017) are trained alongside the
    initial weights.
    """

    display_name = "MAML"
    family = "maml"

    @classmethod
    def display_name_for(cls, config=None) -> str:
        first_order = bool((config or {}).get("first_order", False))
        return "first-order MAML" if first_order or cls.grad_mode == "first_order" else "MAML"

    def __init__(self, *args, first_order: bool = False, **kwargs) -> None:
        self.grad_mode = "first_order" if first_order else "second_order"
        if first_order:
            self.display_name = "first-order MAML"
        super().__init__(*args, **kwargs)

    def meta_loss(self, batch: TaskBatch):
        if self.objective == "query" and not batch.has_query:
            raise ValueError("algorithm.objective=query needs a task with a query set")
        result = self.adapt(batch, self.grad_mode)
        loss = self.objective_loss(result, batch)
        logs = {"support_loss_pre": result.step_losses[:, 0].mean().detach()}
        return loss, logs


class FOMAML(MAML):
    """First-order MAML (``MAML(first_order=True)``)."""

    display_name = "first-order MAML"
    grad_mode = "first_order"

    def __init__(self, *args, **kwargs) -> None:
        kwargs["first_order"] = True
        super().__init__(*args, **kwargs)
