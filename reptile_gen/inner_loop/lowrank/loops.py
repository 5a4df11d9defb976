"""The loops of a low-rank run (buffered without a graph, with a graph) and what it
returns (losses, adapted weights or their task-mean)."""

from __future__ import annotations

import math

import torch

from reptile_gen.inner_loop.core import InnerLoopResult, sgd_step
from reptile_gen.inner_loop.lowrank.checkpoint import CheckpointedLoop, Outputs
from reptile_gen.inner_loop.lowrank.fold import DenseHistory
from reptile_gen.inner_loop.lowrank.sites import Site, fold, folds
from reptile_gen.inner_loop.lowrank.state import Env, pad_tasks, scale_rows, update_prefix

__all__ = ["RunLoops"]


class RunLoops:
    """The loops and results of :class:`~reptile_gen.inner_loop.lowrank.run.Run`."""

    def buffered(
        self,
        env,
        small,
        steps,
        history,
        outs,
        keep_graph,
        in_place=False,
        snapshots=None,
        tails=True,
    ):
        """Run ``steps`` (indices) whose history rows are constants (no graph through
        them: ``none``, first-order and truncated steps, the checkpointed forward),
        writing the rows into ``history`` in place. ``outs`` collects the per-step
        losses; ``snapshots`` (``{step: list}``) receives copies of the small parameters
        before the listed steps. Returns the small parameters after the steps.

        A step runs on the tasks still active (a prefix, see ``active``); the rows of
        the others are zeroed at the end (``tails``; False: left unwritten, for a caller
        that reads only the live rows, see :meth:`idle_tails`).

        The writes go through ``.data``: autograd may hold views of the rows already
        written (first-order losses depend on them), and the buffer is append-only, so
        those rows never change; ``.data`` keeps the version check from flagging it.
        """
        writers = [(a.data, d.data) for a, d in history]
        b = self.num_tasks
        dense = DenseHistory(
            self, history, env.weights, self.engine.fold, keep_graph, outs.track_query
        )
        for i in steps:
            if snapshots is not None and i in snapshots:
                snapshots[i] = [p.clone() for p in small]
            small, elements = self.buffered_step(
                i, env, small, writers, dense, keep_graph, in_place
            )
            outs.add(self, self.steps[i], elements)
            if outs.track_query:
                self.idle_tails(history, i + 1, since=i)
                upto = [r + s.rows for r, s in zip(self._rows(i), self.sites)]
                outs.queries.append(self.query_loss(env, small, dense.pieces(upto, b)))
        if tails and steps:
            self.idle_tails(history, steps[-1] + 1)
        return small

    def buffered_step(
        self, i, env, small, writers, dense, keep_graph, in_place, data=None, choose=None
    ):
        """Step ``i`` of :meth:`buffered` on the tasks still active: it reads the history
        before it (``dense``, a :class:`~.fold.DenseHistory`), writes its rows through
        ``writers`` (per site, the ``(A, D)`` buffers) and updates the small parameters
        (in place, or as new tensors). ``data``: the step's ``(x, y, m)`` of the active
        tasks (None: the run's support set); ``choose``: see :meth:`step`. Returns the
        small parameters and the ``[B, width]`` element losses."""
        step = self.steps[i]
        rows = self._rows(i)
        scales, small_rates = env.at(i)
        n = self.active[i]  # the tasks [n:] have only padding left: no-op steps
        elements = torch.zeros(0, self.width, dtype=self.dtype, device=self.device)
        if n:
            x, y, m = (t[:n] for t in self.step_data(step)) if data is None else data
            dense.before_step(rows, n)
            pieces = dense.pieces(rows, n)
            part = [p[:n] for p in small] if n < self.num_tasks else small
            if self.fast is not None and not keep_graph:
                g_small, deltas, elements, inputs = self.fast.step(
                    env, part, pieces, x, y, m, choose
                )
            else:
                g_small, deltas, elements, inputs = self.step(
                    env, part, pieces, x, y, m, keep_graph, False, choose
                )
            written = zip(writers, rows, self.sites, inputs, deltas, scales)
            for (wa, wd), r, s, a, d, c in written:
                wa[:n, r : r + s.rows] = a.detach()
                wd[:n, r : r + s.rows] = scale_rows(d, c, s, a).detach()
            if in_place:
                for p, g, rate in zip(small, g_small, small_rates):
                    sgd_step(p[:n], g, rate, "inplace")
            else:
                small = [
                    update_prefix(p, g.detach(), rate, n)
                    for p, g, rate in zip(small, g_small, small_rates)
                ]
        return small, pad_tasks(elements, self.num_tasks)

    def with_graph(self, env, small, base, steps, block, outs):
        """Run ``steps`` with history rows that carry the graph (second-order). ``base``:
        per site, history pieces before these steps. New rows are kept as one
        concatenated prefix plus the last few steps' rows, re-concatenated every ``block``
        steps. Returns the small parameters after the steps and, per site, the new rows
        ``(A, D)`` (or None)."""
        n = len(self.sites)
        prefix: list[tuple | None] = [None] * n
        local: list[list] = [[] for _ in range(n)]

        def joined(j):
            parts = ([prefix[j]] if prefix[j] is not None else []) + local[j]
            if not parts:
                return None
            if len(parts) == 1:
                return parts[0]
            return (torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1))

        def pieces_now():
            out = []
            for j in range(n):
                recent = local[j]
                if len(recent) > 1:
                    recent = [
                        (
                            torch.cat([p[0] for p in recent], 1),
                            torch.cat([p[1] for p in recent], 1),
                        )
                    ]
                out.append(list(base[j]) + ([prefix[j]] if prefix[j] is not None else []) + recent)
            return out

        b = self.num_tasks
        for i in steps:
            step = self.steps[i]
            scales, small_rates = env.at(i)
            k = self.active[i]  # the tasks [k:] have only padding left: constant zero rows
            if k:
                pieces = pieces_now()
                if k < b:
                    pieces = [[tuple(t[:k] for t in pc) for pc in site] for site in pieces]
                x, y, m = (t[:k] for t in self.step_data(step))
                part = [p[:k] for p in small] if k < b else small
                g_small, deltas, elements, inputs = self.step(
                    env, part, pieces, x, y, m, True, not step.first_order
                )
                if step.first_order:
                    g_small = [g.detach() for g in g_small]
                    deltas = [d.detach() for d in deltas]
                    inputs = [a.detach() for a in inputs]
                small = [
                    update_prefix(p, g, rate, k) for p, g, rate in zip(small, g_small, small_rates)
                ]
            else:
                elements = torch.zeros(0, self.width, dtype=self.dtype, device=self.device)
                deltas = [
                    torch.zeros(0, s.rows, s.out_width, dtype=self.dtype, device=self.device)
                    for s in self.sites
                ]
                inputs = [
                    torch.zeros(0, s.rows, dtype=torch.long, device=self.device)
                    if s.embedding
                    else torch.zeros(0, s.rows, s.in_width, dtype=self.dtype, device=self.device)
                    for s in self.sites
                ]
            if k < b:
                elements, *deltas = (pad_tasks(t, b) for t in (elements, *deltas))
                inputs = [pad_tasks(t, b) for t in inputs]
            for j in range(n):
                local[j].append(
                    (inputs[j], scale_rows(deltas[j], scales[j], self.sites[j], inputs[j]))
                )
            outs.add(self, step, elements)
            if outs.track_query:
                outs.queries.append(self.query_loss(env, small, pieces_now()))
            if len(local[0] if n else ()) >= block:
                prefix = [joined(j) for j in range(n)]
                local = [[] for _ in range(n)]
        return small, [joined(j) for j in range(n)]

    # ------------------------------------------------------------------ result
    def result(self, track_query: bool, return_adapted) -> InnerLoopResult:
        track = track_query and self.query is not None
        env = self.env
        with self.hooks():
            initial_query = None
            if self.query is not None and track:
                initial_query = self.query_loss(env, self.small0, [[] for _ in self.sites])
            outs = Outputs(track)
            if self.grad_mode == "none":
                history = self.new_history()
                small = [p.clone() for p in self.small0]
                # Reptile's mean of the adapted weights reads the live rows only
                tails = self.query is not None or return_adapted is True
                small = self.buffered(
                    env, small, range(self.num_steps), history, outs, False, True, None, tails
                )
                pieces = [[h] for h in history]
                steps_t, elements_t, queries_t = outs.stacked(self)
            elif self.grad_mode == "first_order" or self.segments == 1:
                history = self.new_history()
                fo = sum(s.first_order for s in self.steps)
                if env.rows_hold_rates:
                    fo = 0  # rows with a graph to their learned rates: not in the buffers
                small = self.buffered(env, self.small0, range(fo), history, outs, True)
                rows = self._rows(fo)
                base = [[(a[:, :r], d[:, :r])] if r else [] for (a, d), r in zip(history, rows)]
                pieces = base
                if fo < self.num_steps:
                    block = max(1, math.ceil(math.sqrt(self.num_steps - fo)))
                    # the first-order rows are constants: read them folded (one GEMM)
                    folded = [
                        [fold(s, w, *p[0])] if p and folds(s, w, r, self.engine.fold) else p
                        for s, w, p, r in zip(self.sites, env.weights, base, rows)
                    ]
                    small, new = self.with_graph(
                        env, small, folded, range(fo, self.num_steps), block, outs
                    )
                    pieces = [list(p) + ([r] if r is not None else []) for p, r in zip(base, new)]
                steps_t, elements_t, queries_t = outs.stacked(self)
            else:
                bounds = [
                    round(k * self.num_steps / self.segments) for k in range(self.segments + 1)
                ]
                ns, nsite = len(self.small_names), len(self.sites)
                res = CheckpointedLoop.apply(
                    self, bounds, track, *env.weights, *self.small0, *self.rate_tensors
                )
                steps_t, elements_t, queries_t = res[:3]
                small = list(res[3 : 3 + ns])
                hist = res[3 + ns :]
                pieces = [[(hist[j], hist[nsite + j])] for j in range(nsite)]
            query_losses = None
            if self.query is not None:
                if track:
                    query_losses = torch.cat([initial_query[:, None], queries_t], 1)
                else:
                    query_losses = self.query_loss(env, small, pieces)[:, None]
            adapted = adapted_mean = None
            if return_adapted == "mean":
                adapted_mean = self.adapted(env, small, pieces, mean=True)
            elif return_adapted:
                adapted = self.adapted(env, small, pieces, mean=False)
        element_losses = self.gather_elements(elements_t)
        return InnerLoopResult(
            step_losses=steps_t,
            element_losses=element_losses,
            query_losses=query_losses,
            adapted=adapted,
            adapted_mean=adapted_mean,
        )

    def gather_elements(self, elements: torch.Tensor) -> torch.Tensor:
        """``[B, S]`` online losses from the per-step ``[B, T, width]`` element losses."""
        b = self.num_tasks
        index = [
            i * self.width + k for i, s in enumerate(self.steps) if s.record for k in range(s.count)
        ]
        flat = elements.reshape(b, -1)[:, torch.tensor(index, dtype=torch.long)]
        missing = self.support_len - flat.shape[1]
        if missing > 0:
            flat = torch.nn.functional.pad(flat, (0, missing))
        return flat[:, : self.support_len]

    def live_rows(self, site: Site, a: torch.Tensor, d: torch.Tensor):
        """The history rows ``(A, D)`` (``[B, R, ...]``) written by active steps, as
        ``[N, ...]`` (the rows of idle steps may be unwritten); unchanged (flattened)
        when every row is live or the rows are not a whole history."""
        if self.live_steps is None or a.shape[1] != self.num_steps * site.rows:
            return a.flatten(0, 1), d.flatten(0, 1)
        rows = [live * site.rows for live in self.live_steps]
        return (
            torch.cat([t[:r] for t, r in zip(a, rows)]),
            torch.cat([t[:r] for t, r in zip(d, rows)]),
        )

    def adapted(self, env: Env, small, pieces, mean: bool) -> dict[str, torch.Tensor]:
        """Adapted parameters ``{name: [B, ...]}``, or their task-mean ``{name: [...]}``
        (one GEMM per layer over all tasks' history rows)."""
        b = self.num_tasks
        out = {n: (p.mean(0) if mean else p) for n, p in zip(self.small_names, small)}
        for site, w0, rate, site_pieces in zip(self.sites, env.weights, env.site_rates, pieces):
            total = None
            for a, d in site_pieces:
                if mean:
                    a, d = self.live_rows(site, a, d)  # [N, ...] rows of all tasks
                if site.embedding:
                    if mean:
                        u = torch.zeros_like(w0).index_add(0, a, d)
                    else:
                        u = torch.zeros(b, *w0.shape, dtype=d.dtype, device=d.device).scatter_add(
                            1, a.unsqueeze(-1).expand(-1, -1, d.shape[-1]), d
                        )
                elif mean:
                    u = d.T @ a
                else:
                    u = torch.bmm(d.transpose(1, 2), a)
                total = u if total is None else total + u
            if total is None:
                out[site.name] = w0 if mean else w0.expand(b, *w0.shape)
            else:
                out[site.name] = w0 - (rate / b if mean else rate) * total
        return {n: out[n] for n in self.param_names}
