"""The low-rank engine's no-graph online loop, one step at a time, for a caller that
chooses each step's targets after seeing the step's predictions (sampling).

The step is the engine's own (:meth:`.loops.RunLoops.buffered_step`, the general or the
hand-written MLP step): the forward pass reads the shared initial weights plus each
sequence's history of rank-one updates (folded into a dense per-sequence delta where that
reads less, :class:`~.fold.DenseHistory`), ``choose`` picks the targets (draws them), and
the step appends its rows to the history. So the sampled sequences follow the dynamics of
``engine=lowrank`` exactly, with the rates of the core (fixed, scheduled, learned scalar,
per-tensor, per-unit and per-step).
"""

from __future__ import annotations

import torch

from reptile_gen.data.task_batch import TaskBatch
from reptile_gen.inner_loop.lowrank.fold import DenseHistory
from reptile_gen.inner_loop.lowrank.run import Run

__all__ = ["OnlineRun"]


class OnlineRun:
    """Online inner SGD over ``B`` sequences without a graph, driven step by step.

    Args:
        engine: the :class:`~reptile_gen.inner_loop.lowrank.LowRankEngine` whose options
            (``fold``) the steps use.
        model: the model; its parameters are the initial ones, shared by the sequences.
        x: ``[B, S, ...]`` model inputs of every element (values of the right kind: only
            the first step's shapes are read here; each step is given its own inputs).
        loss_fn, lr, schedule: as for :meth:`InnerLoopEngine.run` (the online schedule:
            one step per ``inner_batch_size`` elements).

    Every step runs on all ``B`` sequences: an element whose mask is False (padding, a
    sequence that has ended) adds nothing to the history, so a step made only of them
    leaves the sequence unchanged, as in the engine.
    """

    def __init__(self, engine, model, x: torch.Tensor, loss_fn, lr, schedule) -> None:
        y = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
        batch = TaskBatch(support_x=x, support_y=y)
        with torch.no_grad():
            self.run = run = Run(engine, model, batch, loss_fn, lr, schedule, "none")
        self.history = run.new_history()
        self._writers = [(a.data, d.data) for a, d in self.history]
        self.small = [p.clone() for p in run.small0]
        self._dense = DenseHistory(run, self.history, run.env.weights, engine.fold, False, False)
        self.steps_taken = 0

    @property
    def num_steps(self) -> int:
        """Inner steps of the whole sequence (one per ``inner_batch_size`` elements)."""
        return self.run.num_steps

    @property
    def width(self) -> int:
        """Elements per step (a short last step is padded to it with masked elements)."""
        return self.run.width

    def step(self, i: int, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor, choose=None):
        """Step ``i`` on the elements ``x [B, width, ...]`` with targets ``y [B, width]``
        and mask ``m [B, width]``; ``choose(outputs, y, m) -> (y, m)`` (batched over the
        sequences; ``outputs``: the step's detached model outputs) may replace the
        targets and the mask before the loss. Returns the ``[B, width]`` element losses
        (0 off the mask)."""
        run = self.run
        with run.hooks():  # the low-rank layers' hooks, on the model for this step only
            self.small, elements = run.buffered_step(
                i, run.env, self.small, self._writers, self._dense, False, True, (x, y, m), choose
            )
        self.steps_taken = max(self.steps_taken, i + 1)
        return elements

    def adapted(self) -> dict[str, torch.Tensor]:
        """Each sequence's parameters after the steps taken, ``{name: [B, ...]}`` (dense
        weights: the initial ones minus the rate times the history's sum)."""
        run = self.run
        rows = [self.steps_taken * site.rows for site in run.sites]
        pieces = [[(a[:, :r], d[:, :r])] if r else [] for (a, d), r in zip(self.history, rows)]
        with torch.no_grad():
            return run.adapted(run.env, self.small, pieces, mean=False)

    @property
    def folds(self) -> int:
        """Dense folds done so far (a count for tests)."""
        return self._dense.folds
