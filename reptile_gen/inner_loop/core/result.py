"""What every inner-loop engine returns and the interface it implements."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from reptile_gen.data.task_batch import TaskBatch
    from reptile_gen.inner_loop.core.plan import InnerSchedule
    from reptile_gen.inner_loop.core.rates import InnerLR

__all__ = ["InnerLoopEngine", "InnerLoopResult", "LossFn", "masked_mean"]

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
        adapted_mean: their task-mean ``{name: [...]}``; an engine may fill it instead of
            ``adapted`` when asked for ``return_adapted="mean"`` (read it through
            :meth:`mean_adapted`, which falls back on ``adapted``).
        objective: the task-mean of the final query loss, if the engine produced it as an
            output of its own (with its own backward); read it through
            :meth:`query_objective`, which falls back on ``query_losses``.
    """

    step_losses: torch.Tensor
    element_losses: torch.Tensor
    query_losses: torch.Tensor | None = None
    adapted: dict[str, torch.Tensor] | None = None
    adapted_mean: dict[str, torch.Tensor] | None = None
    objective: torch.Tensor | None = None

    def query_objective(self) -> torch.Tensor:
        """The task-mean of the final query loss (MAML's meta-objective)."""
        if self.objective is not None:
            return self.objective
        return self.final_query_loss.mean()

    @property
    def final_query_loss(self) -> torch.Tensor:
        """``[B]`` query loss after the last inner step."""
        if self.query_losses is None:
            raise ValueError("this inner loop ran without a query set")
        return self.query_losses[:, -1]

    def mean_adapted(self) -> dict[str, torch.Tensor]:
        """Task-mean of the adapted parameters (what Reptile moves toward)."""
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

    Subclasses implement :meth:`run` and :meth:`from_options`. ``grad_mode`` says what
    flows back to the initial parameters (and learned inner learning rates):

    * ``second_order``: the full unrolled meta-gradient (MAML);
    * ``first_order``: inner gradients treated as constants (first-order MAML), so
      ``d theta_t / d theta_0 = I``;
    * ``none``: no graph at all (Reptile, evaluation).
    """

    name: ClassVar[str] = "base"

    @classmethod
    def from_options(
        cls, inner_optimizer: str, inner_optimizer_kwargs: dict, options: dict
    ) -> InnerLoopEngine:
        """The engine built from the config's options (``inner_optimizer``: its name;
        ``options``: chunk_size, checkpoint_segments, truncate_steps, inner_lr_learned,
        inner_lr_schedule, inner_momentum, compile). An option this engine cannot do is a
        clear error, never ignored."""
        raise NotImplementedError

    @staticmethod
    def refuse_compile(name: str, options: dict) -> None:
        """A clear error for ``engine.compile`` on an engine that has no compiled form."""
        compile_ = options.get("compile", False)
        if compile_ is not False:
            raise ValueError(
                f"engine.compile={compile_!r} with engine={name}: compiling the meta-step "
                "is a functional-engine option; allowed: engine.compile=false, or "
                "engine=functional"
            )

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
