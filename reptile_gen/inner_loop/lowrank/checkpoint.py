"""The checkpointed low-rank loop: segments recomputed in backward (``run``: the
:class:`~reptile_gen.inner_loop.lowrank.run.Run` being differentiated)."""

from __future__ import annotations

import torch
from torch.profiler import record_function

from reptile_gen.inner_loop.core.recompute import add_grad, leaves, vjp
from reptile_gen.inner_loop.lowrank.sites import fold, folds
from reptile_gen.inner_loop.lowrank.state import Env, Step

__all__ = ["CheckpointedLoop", "Outputs"]


class Outputs:
    """Per-step losses collected by the loops."""

    def __init__(self, track_query: bool) -> None:
        self.track_query = track_query
        self.step_losses: list[torch.Tensor] = []
        self.elements: list[torch.Tensor] = []
        self.queries: list[torch.Tensor] = []

    def add(self, run, step: Step, elements: torch.Tensor) -> None:
        _, _, m = run.step_data(step)
        count = m.sum(1).clamp(min=1).to(elements.dtype)
        self.step_losses.append(elements.sum(1) / count)
        self.elements.append(elements)

    def stacked(self, run):
        b = run.num_tasks
        zeros = torch.zeros(b, 0, dtype=run.dtype, device=run.device)
        steps = torch.stack(self.step_losses, 1) if self.step_losses else zeros
        elements = (
            torch.stack(self.elements, 1)
            if self.elements
            else torch.zeros(b, 0, run.width, dtype=run.dtype, device=run.device)
        )
        queries = torch.stack(self.queries, 1) if self.queries else zeros
        return steps, elements, queries


class CheckpointedLoop(torch.autograd.Function):
    """Second-order inner loop recomputed segment by segment in backward.

    Forward runs every step without a graph, writing the history into buffers, and keeps
    the small parameters at each segment's start. Backward walks the segments in reverse:
    it reruns one with its graph from its saved small parameters and the history prefix
    (a slice of the final buffers, made a leaf), and backpropagates into them the
    gradients of the segment's outputs: its losses, its small parameters at the end (from
    the later segments) and its history rows (accumulated from every later segment that
    read them). The prefix's gradient is added to the rows of earlier segments.

    Not a :class:`~reptile_gen.inner_loop.core.recompute.RecomputedSegment` per segment:
    the history buffers are written in place by every segment and read by all later ones,
    so they cannot be a segment's inputs and outputs; the backward uses the same core
    pieces (``leaves``, ``vjp``, ``add_grad``).

    Inputs: the shared weights, the initial (expanded) small parameters, the learned rate
    tensors. Outputs: step losses ``[B, T]``, element losses ``[B, T, width]``, tracked
    query losses ``[B, T]`` (or ``[B, 0]``), final small parameters, history ``A`` then
    ``D`` per site.
    """

    @staticmethod
    def forward(ctx, run, bounds: list[int], track: bool, *tensors):
        nw, ns = len(run.sites), len(run.small_names)
        weights, small0, rates = tensors[:nw], tensors[nw : nw + ns], tensors[nw + ns :]
        # no graph in forward: detached inputs (backward recomputes with the real ones)
        env = Env([w.detach() for w in weights], [r.detach() for r in rates], run)
        history = run.new_history()
        snapshots = {b: None for b in bounds[1:-1]}
        outs = Outputs(track)
        small = [p.detach().clone() for p in small0]
        steps = range(run.num_steps)
        small = run.buffered(env, small, steps, history, outs, False, True, snapshots)
        steps, elements, queries = outs.stacked(run)
        ctx.run, ctx.bounds, ctx.track = run, bounds, track
        ctx.snapshots = [None] + [snapshots[b] for b in bounds[1:-1]]
        a_hist = [h[0] for h in history]
        d_hist = [h[1] for h in history]
        ctx.save_for_backward(*tensors, *a_hist, *d_hist)
        ctx.mark_non_differentiable(*(a for a, s in zip(a_hist, run.sites) if s.embedding))
        return (steps, elements, queries, *small, *a_hist, *d_hist)

    @staticmethod
    def backward(ctx, g_steps, g_elements, g_queries, *g_rest):
        run = ctx.run
        nw, ns = len(run.sites), len(run.small_names)
        saved = ctx.saved_tensors
        nt = len(saved) - 2 * nw
        tensors, a_hist, d_hist = saved[:nt], saved[nt : nt + nw], saved[nt + nw :]

        weights = leaves(tensors[:nw])
        rates = leaves(tensors[nw + ns :])
        env = Env(weights, rates, run)
        g_small = list(g_rest[:ns])
        g_a = [
            None if s.embedding else (g if g is not None else torch.zeros_like(a))
            for s, g, a in zip(run.sites, g_rest[ns : ns + nw], a_hist)
        ]
        g_d = [
            g if g is not None else torch.zeros_like(d) for g, d in zip(g_rest[ns + nw :], d_hist)
        ]
        g_weights = [None] * nw
        g_rates = [None] * len(rates)
        bounds = ctx.bounds
        for k in reversed(range(len(bounds) - 1)):
            lo, hi = bounds[k], bounds[k + 1]
            start = tensors[nw : nw + ns] if k == 0 else ctx.snapshots[k]
            small = [t.detach().requires_grad_(True) for t in start]
            r0, r1 = run._rows(lo), run._rows(hi)
            base, prefix_leaves = [], []
            with torch.enable_grad():
                for s, w, a, d, r in zip(run.sites, weights, a_hist, d_hist, r0):
                    if r:
                        pa = a[:, :r].detach().requires_grad_(not s.embedding)
                        pd = d[:, :r].detach().requires_grad_(True)
                        if folds(s, w, r, run.engine.fold):
                            with record_function("lowrank.fold"):
                                base.append([fold(s, w, pa, pd)])
                        else:
                            base.append([(pa, pd)])
                        prefix_leaves.append((pa, pd))
                    else:
                        base.append([])
                        prefix_leaves.append(None)
            outs = Outputs(ctx.track)
            with torch.enable_grad(), run.hooks(), record_function("lowrank.recompute"):
                small_end, new = run.with_graph(env, small, base, range(lo, hi), hi - lo, outs)
                steps, elements, queries = outs.stacked(run)
            pairs = [(steps, g_steps[:, lo:hi]), (elements, g_elements[:, lo:hi])]
            if ctx.track:
                pairs.append((queries, g_queries[:, lo:hi]))
            pairs += list(zip(small_end, g_small))
            for j, (s, rows) in enumerate(zip(run.sites, new)):
                if rows is None:
                    continue
                if not s.embedding:
                    pairs.append((rows[0], g_a[j][:, r0[j] : r1[j]]))
                pairs.append((rows[1], g_d[j][:, r0[j] : r1[j]]))
            prefix = [t for pl in prefix_leaves if pl is not None for t in pl]
            outputs, grad_outputs = zip(*pairs)
            with record_function("lowrank.backward"):
                it = iter(vjp(outputs, grad_outputs, [*small, *prefix, *weights, *rates]))
            g_small = [next(it) for _ in small]
            for j, pl in enumerate(prefix_leaves):
                if pl is None:
                    continue
                ga, gd = next(it), next(it)  # ga: None for an embedding's index rows
                if ga is not None:
                    g_a[j][:, : r0[j]] += ga
                if gd is not None:
                    g_d[j][:, : r0[j]] += gd
            g_weights = [add_grad(acc, next(it)) for acc in g_weights]
            g_rates = [add_grad(acc, next(it)) for acc in g_rates]
        return (None, None, None, *g_weights, *g_small, *g_rates)
