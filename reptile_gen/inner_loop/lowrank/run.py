"""One low-rank inner loop over a meta-batch: its plan, sites, rates and one step."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.func import functional_call, vmap
from torch.profiler import record_function

from reptile_gen.inner_loop.core import (
    RateSlots,
    first_order_before,
    first_visit,
    last_active_step,
    num_segments,
)
from reptile_gen.inner_loop.lowrank.loops import RunLoops
from reptile_gen.inner_loop.lowrank.mlp import mlp_stepper
from reptile_gen.inner_loop.lowrank.sites import Tape, candidate_sites
from reptile_gen.inner_loop.lowrank.state import Env, Step, pad_to, step_losses

__all__ = ["Run"]


class Run(RunLoops):
    """One inner loop over a meta-batch (all the state of :meth:`LowRankEngine.run`)."""

    def __init__(self, engine, model, batch, loss_fn, lr, schedule, grad_mode) -> None:
        self.engine = engine
        self.model = model
        self.loss_fn = loss_fn
        self.buffers = dict(model.named_buffers())
        self.num_tasks = batch.num_tasks
        self.support_len = batch.support_x.shape[1]
        named = list(model.named_parameters())
        self.param_names = [n for n, _ in named]
        params = dict(named)
        # every name of a tied parameter gets its tensor (functional_call then needs no
        # per-call tie detection: tie_weights=False)
        canonical = {id(p): n for n, p in named}
        self.aliases = [
            (n, canonical[id(p)])
            for n, p in model.named_parameters(remove_duplicate=False)
            if canonical[id(p)] != n
        ]
        first = next(iter(params.values()))
        self.dtype, self.device = first.dtype, first.device
        self.graph = torch.is_grad_enabled() and grad_mode != "none"
        self.grad_mode = grad_mode if self.graph else "none"
        self._plan_steps(batch, schedule, grad_mode)
        self._find_sites(params)
        self._bind_parameters(params, lr)
        # the hand-written no-graph step of plain MLP models (None: the general step)
        self.fast = mlp_stepper(self) if self.sites else None

    def _plan_steps(self, batch, schedule, grad_mode: str) -> None:
        """The steps (every one padded to the same element count, masked), the padded
        support set, the tasks still active at each step and the checkpoint segments."""
        num_tasks, support_len = self.num_tasks, self.support_len
        slices = schedule.slices(support_len)
        records = first_visit(slices)
        num_steps = len(slices)
        n_first_order = first_order_before(num_steps, grad_mode, self.engine.truncate_steps)
        self.width = width = max((e - s for s, e in slices), default=1) or 1
        self.steps = [
            Step(s, e - s, rec, i < n_first_order)
            for i, ((s, e), rec) in enumerate(zip(slices, records))
        ]
        self.num_steps = num_steps
        padded = max([s + width for s, _ in slices] + [support_len])
        self.sx, self.sy, self.mask = (
            pad_to(batch.support_x, padded),
            pad_to(batch.support_y, padded),
            pad_to(batch.support_mask, padded),
        )
        self.query = (batch.query_x, batch.query_y) if batch.has_query else None
        # tasks still active at each step (a prefix of the batch when it is ordered by
        # last active step, see LowRankEngine.run; all tasks otherwise)
        last = last_active_step(self.mask, [(s.start, s.start + s.count) for s in self.steps])
        self.live_steps: list[int] | None = None  # per task: steps up to its last active one
        if num_tasks < 2 or bool((last[:-1] >= last[1:]).all()):
            steps_index = torch.arange(num_steps, device=last.device)
            self.active = (last[None, :] >= steps_index[:, None]).sum(1).tolist()
            if self.active and self.active[-1] < num_tasks:
                self.live_steps = (last + 1).tolist()
        else:
            self.active = [num_tasks] * num_steps
        self.segments = 1
        if self.grad_mode == "second_order":
            self.segments = num_segments(self.engine.checkpoint_segments, max(num_steps, 1))

    def _find_sites(self, params: dict) -> None:
        """The low-rank layers: those the model calls (once) on a support step, with
        their shapes read off one probing call."""
        sites = candidate_sites(self.model)
        self.tape: Tape | None = None
        if sites and self.num_steps:
            x0 = self.sx[0, self.steps[0].start : self.steps[0].start + self.width]
            tape = Tape([[] for _ in sites], [0.0] * len(sites), discover=True)
            self.sites = sites
            with torch.no_grad(), self.hooks():
                self._call(tape, params, x0)
            for site, shapes in zip(sites, tape.shapes):
                if shapes is None:
                    continue
                in_shape, out_shape = shapes
                site.probe_shape = out_shape
                site.out_width = out_shape[-1]
                site.in_width = 0 if site.embedding else in_shape[-1]
                site.rows = math.prod(in_shape) if site.embedding else math.prod(in_shape[:-1])
            sites = [s for s, shapes in zip(sites, tape.shapes) if shapes is not None]
        elif not self.num_steps:
            sites = []
        self.sites = sites
        self.site_names = [s.name for s in sites]
        self.small_names = [n for n in self.param_names if n not in set(self.site_names)]

    def _bind_parameters(self, params: dict, lr) -> None:
        """The shared initial weights of the sites, the per-task small parameters and
        the rates: learned ones become explicit inputs (the checkpointed loop returns
        their gradients), fixed ones stay floats."""
        rates = lr.rates_by_name()
        if not self.graph:
            rates = {k: (r.detach() if torch.is_tensor(r) else r) for k, r in rates.items()}
        # rates that change along the loop go into the history rows (see Env)
        self.rate_slots = RateSlots(rates, lr.step_rates(self.num_steps))
        self.rate_tensors = self.rate_slots.tensors
        weights = [params[n] for n in self.site_names]
        small = [params[n] for n in self.small_names]
        if not self.graph:
            weights = [w.detach() for w in weights]
            small = [p.detach() for p in small]
        self.env = Env(weights, self.rate_tensors, self)
        self.small0 = [p.expand(self.num_tasks, *p.shape) for p in small]

    # ------------------------------------------------------------------ helpers
    @contextmanager
    def hooks(self) -> Iterator[None]:
        """The low-rank layers' forward hooks, installed for the duration (also around a
        checkpointed segment's recomputation in backward)."""

        def make(i):
            def hook(module, args, out):
                tape = self.tape
                return None if tape is None else tape.apply(i, self.sites[i], args[0], out)

            return hook

        handles = [s.module.register_forward_hook(make(i)) for i, s in enumerate(self.sites)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _call(self, tape: Tape, params: dict, x: torch.Tensor) -> torch.Tensor:
        self.tape = tape
        try:
            for alias, name in self.aliases:
                params[alias] = params[name]
            return functional_call(self.model, (params, self.buffers), (x,), tie_weights=False)
        finally:
            self.tape = None

    def _params(self, env: Env, small) -> dict:
        params = dict(zip(self.small_names, small))
        params.update(zip(self.site_names, env.weights))
        return params

    def step_data(self, step: Step):
        sl = slice(step.start, step.start + self.width)
        x, y, m = self.sx[:, sl], self.sy[:, sl], self.mask[:, sl]
        if step.count < self.width:  # a short slice, filled up with masked elements
            m = m & (torch.arange(self.width, device=m.device) < step.count)
        return x, y, m

    def _rows(self, step_index: int) -> list[int]:
        return [step_index * s.rows for s in self.sites]

    # -------------------------------------------------------------- vmapped pieces
    def step(
        self, env: Env, small, pieces, x, y, m, keep_graph: bool, differentiable: bool, choose=None
    ):
        """One inner step of every task: ``(small grads, deltas, elements, inputs)``,
        batched over tasks (deltas ``[B, rows, out]``, inputs ``[B, rows, in]``).

        Only the forward pass is ``vmap``-ed; the gradients come from one ordinary
        ``autograd.grad`` of the sum of the tasks' losses (tasks share nothing that is
        differentiated here, so each task's probes and small parameters receive that
        task's own gradient). This keeps the backward pass out of the batching rules,
        which cost more than the arithmetic on these small per-element steps.

        Args:
            keep_graph: the losses and inputs keep their graph to the initial parameters
                (first- and second-order runs); otherwise everything returned is detached.
            differentiable: the gradients themselves carry a graph (second order).
            choose: None, or ``choose(logits, y, m) -> (y, m)`` called between the forward
                pass and the loss with the step's detached model outputs ``[B, ...]``: the
                targets and mask the step then trains on (sampling draws them, see
                :class:`~reptile_gen.inner_loop.lowrank.online.OnlineRun`).
        """
        if self.engine.on_step is not None:
            self.engine.on_step("general", x.shape[0])
        b = x.shape[0]
        small = [p if p.requires_grad else p.detach().requires_grad_() for p in small]
        probes = [
            torch.zeros(b, *s.probe_shape, dtype=self.dtype, device=self.device, requires_grad=True)
            for s in self.sites
        ]

        ns, lengths = len(small), [[len(piece) for piece in p] for p in pieces]

        def one_task(*flat):
            # flat arguments: vmap's pytree handling of nested ones costs more than this
            small_t, rest = flat[:ns], flat[ns:]
            pieces_t, k = [], 0
            for site_lengths in lengths:
                site_pieces = []
                for n in site_lengths:
                    site_pieces.append(tuple(rest[k : k + n]))
                    k += n
                pieces_t.append(site_pieces)
            probes_t, x_t = rest[k:-1], rest[-1]
            tape = Tape(pieces_t, env.site_rates, probes_t)
            out = self._call(tape, self._params(env, small_t), x_t)
            return (out, *tape.inputs)

        flat_pieces = [t for site_pieces in pieces for pair in site_pieces for t in pair]
        with torch.enable_grad():
            with record_function("lowrank.forward"):
                out, *inputs = vmap(one_task, randomness="different")(
                    *small, *flat_pieces, *probes, x
                )
                if choose is not None:
                    y, m = choose(out.detach(), y, m)
                losses, elements = step_losses(self.loss_fn, out, y, m)
            with record_function("lowrank.probe_grads"):
                grads = torch.autograd.grad(
                    losses.sum(),
                    [*probes, *small],
                    create_graph=differentiable,
                    retain_graph=keep_graph,
                    allow_unused=True,
                )
        n = len(probes)
        deltas = [
            (torch.zeros_like(p) if g is None else g).reshape(b, s.rows, s.out_width)
            for g, p, s in zip(grads[:n], probes, self.sites)
        ]
        g_small = [torch.zeros_like(p) if g is None else g for g, p in zip(grads[n:], small)]
        if not keep_graph:
            elements = elements.detach()
            inputs = [a.detach() for a in inputs]
        return g_small, deltas, elements, inputs

    def query_loss(self, env: Env, small, pieces) -> torch.Tensor:
        """``[B]`` mean query loss of each task at ``small`` and history ``pieces``."""

        def one_task(small, pieces, qx, qy):
            tape = Tape(pieces, env.site_rates)
            return self.loss_fn(self._call(tape, self._params(env, small), qx), qy).mean()

        return vmap(one_task, randomness="different")(small, pieces, *self.query)

    # ------------------------------------------------------------------ loops
    def new_history(self):
        """Buffers for every step's rows, ``(A, D)`` per site (uninitialised: every step
        writes its rows before any later step reads them)."""
        b, t = self.num_tasks, self.num_steps
        out = []
        for s in self.sites:
            if s.embedding:
                a = torch.empty(b, t * s.rows, dtype=torch.long, device=self.device)
            else:
                a = torch.empty(b, t * s.rows, s.in_width, dtype=self.dtype, device=self.device)
            d = torch.empty(b, t * s.rows, s.out_width, dtype=self.dtype, device=self.device)
            if self.engine.poison_history:
                a.fill_(10**9) if a.dtype == torch.long else a.fill_(float("nan"))
                d.fill_(float("nan"))
            out.append((a, d))
        return out

    def idle_tails(self, history, upto: int | None = None, since: int = 0) -> None:
        """Zero the history rows of steps after each task's last active one (steps
        ``since`` to ``upto``; None: the last): the steps skip those tasks and write
        nothing there, and the rows (zero gradients, finite inputs) are only read by
        calls over all tasks (query losses, per-task adapted weights, second-order
        steps)."""
        if self.live_steps is None:
            return
        upto = self.num_steps if upto is None else upto
        for (a, d), s in zip(history, self.sites):
            for b, live in enumerate(self.live_steps):
                lo = max(live, since)
                if lo < upto:
                    a.data[b, lo * s.rows : upto * s.rows] = 0
                    d.data[b, lo * s.rows : upto * s.rows] = 0
