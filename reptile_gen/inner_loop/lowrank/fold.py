"""The buffered loop's dense fold: per site, a per-task dense delta of the weight plus the
history rows written since it was last folded.

Cost model (numbers read per task, one *use* = one product of the history with a layer's
input or output gradient; a step uses each site twice, forward and backward):

* a history row of a linear site costs ``in + out`` per use (``x @ A^T`` then ``@ D``),
  the dense delta ``in * out`` (``x @ dW^T``);
* folding ``c`` rows costs their ``c * (in + out)`` plus reading and writing the delta,
  ``2 * in * out`` (one ``baddbmm``).

With ``s`` rows per step, the rows cost ``s * (in + out)`` per use more at every step and
folding them every ``c`` rows costs ``2 * in * out * s / c`` per step: the sum (times two
uses) is least at ``c = sqrt(2 * s * in * out / (in + out))``. The delta itself costs
``in * out`` per use from its first fold on, so it is made only once the unfolded rows
cost that much (``k * (in + out) >= in * out``), then refolded every ``c`` rows. A run
with a graph through the losses (first-order, truncated) keeps every delta it read in that
graph, so it folds out of place and only at the first threshold (memory: one delta per
``in * out / (in + out)`` rows). An embedding's delta is read only at the looked-up rows
(``s * out`` per use) and a fold scatters the rows (``c * out``): once the rows cost a
whole table (zero-filled when it is made), every step folds.

Memory: one ``[tasks, out, in]`` (or ``[tasks, rows, width]``) buffer per site, made at
the first fold (e.g. MNIST's original model, 8 gate layers 512->256, 50 tasks, float32:
210 MB), next to the history buffers the results still read (the adapted weights' mean,
the checkpointed backward).

``fold="always"``: every step reads the history before it as a delta; ``"never"``: as
rows (the engine's ``fold`` option).
"""

from __future__ import annotations

import math

import torch
from torch.profiler import record_function

from reptile_gen.inner_loop.lowrank.sites import Site

__all__ = ["DenseHistory", "fold_every"]


def fold_every(site: Site, weight: torch.Tensor, mode: str, graph: bool) -> tuple[int, int]:
    """``(first, every)``: unfolded rows at which the site's delta is made, and at which
    it is folded again afterwards (see the module's cost model; 0: never)."""
    s = max(site.rows, 1)
    if mode == "never":
        return 0, 0
    if mode == "always":
        return s, s
    if site.embedding:
        first = math.ceil(weight.numel() / (1 + site.out_width))
        return first, (first if graph else s)
    cd, cr = site.in_width * site.out_width, site.in_width + site.out_width
    first = max(math.ceil(cd / cr), s)
    every = max(s, round(math.sqrt(2 * s * cd / cr) / s) * s)
    return first, (first if graph else min(every, first))


class DenseHistory:
    """The history pieces the buffered loop's steps read: per site, the dense delta (once
    folded) and the rows after it in the history buffers.

    ``all_tasks``: fold every task's rows (a reader reads all tasks at every step, e.g.
    tracked query losses; the idle tasks' rows are then zeroed as the loop goes); otherwise
    only the active prefix's (the others never read them again in this loop).
    ``graph``: the losses keep a graph that may hold a delta: fold out of place.
    """

    def __init__(self, run, history, weights, mode: str, graph: bool, all_tasks: bool):
        self.run = run
        self.history = history
        self.graph = graph
        self.all_tasks = all_tasks
        self.plans = [fold_every(s, w, mode, graph) for s, w in zip(run.sites, weights)]
        self.shapes = [w.shape for w in weights]
        self.dense: list[torch.Tensor | None] = [None] * len(run.sites)
        self.folded = [0] * len(run.sites)  # rows folded into the delta, per site
        self.folds = 0  # folds done (a count for tests)

    def before_step(self, rows: list[int], n: int) -> None:
        """Fold the rows ``[folded, rows)`` of a site whose unfolded rows reached its
        threshold, for the active tasks ``[:n]`` (every task with ``all_tasks``)."""
        m = self.run.num_tasks if self.all_tasks else n
        for j, (site, (first, every), r) in enumerate(zip(self.run.sites, self.plans, rows)):
            k = r - self.folded[j]
            if not first or k <= 0 or k < (first if self.dense[j] is None else every):
                continue
            with record_function("lowrank.fold"):
                self._fold(j, site, m, self.folded[j], r)
            self.folded[j] = r
            self.folds += 1

    @torch.no_grad()
    def _fold(self, j: int, site: Site, m: int, lo: int, hi: int) -> None:
        a, d = self.history[j]
        a, d = a.data[:m, lo:hi], d.data[:m, lo:hi]
        dense = self.dense[j]
        if dense is None:
            shape = (self.run.num_tasks, *self.shapes[j])
            dense = torch.zeros(shape, dtype=d.dtype, device=d.device)
        elif self.graph:
            dense = dense.clone()  # the graph may hold the old one
        if site.embedding:
            dense[:m].scatter_add_(1, a.unsqueeze(-1).expand(-1, -1, d.shape[-1]), d)
        else:
            dense[:m].baddbmm_(d.transpose(1, 2), a)
        self.dense[j] = dense

    def pieces(self, rows: list[int], n: int) -> list[list[tuple]]:
        """Per site, the history of tasks ``[:n]`` before rows ``rows``: ``[(dW,)]`` then
        the unfolded rows ``(A, D)``."""
        out = []
        for j, r in enumerate(rows):
            site_pieces = []
            if self.dense[j] is not None:
                site_pieces.append((self.dense[j][:n],))
            lo = self.folded[j]
            if r > lo:
                a, d = self.history[j]
                site_pieces.append((a[:n, lo:r], d[:n, lo:r]))
            out.append(site_pieces)
        return out
