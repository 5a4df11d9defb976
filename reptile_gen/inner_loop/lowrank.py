"""The exact low-rank engine (``engine=lowrank``).

One inner SGD step changes a linear layer's weight by ``-alpha * sum_i delta_i a_i^T``
(``a_i``: the layer's input for element ``i`` of the step, ``delta_i``: the loss gradient
at its output), a matrix of rank at most the step's element count. After ``t`` steps

    W_t x = W_0 x - alpha * sum_{s < t} delta_s (a_s . x),

so a task never needs its own copy of ``W``: the engine keeps the initial weights shared by
every task of the meta-batch (one matmul for all of them) and, per task and per layer, the
*history* of rows ``(a_s, delta_s)``. An ``nn.Embedding`` is the same with one-hot inputs:
the history keeps the looked-up indices and their output gradients, and the correction of a
lookup of row ``i`` sums the ``delta_s`` of earlier lookups of ``i``. Every other parameter
(biases, LayerNorm gains, the LSTM block's ``h0``/``c0``, linear layers whose weight is tied
or that are not plain ``nn.Linear``) stays a per-task tensor updated by ordinary SGD.

How it runs: the model is called per task under ``vmap`` with ``functional_call`` and the
initial weights; a forward hook on each low-rank layer subtracts its history's correction
and adds a zero *probe* to its output. ``torch.func.grad`` with respect to the probes gives
the ``delta`` rows (the hook records the layer inputs ``a`` as auxiliary outputs). The
updates are hand-batched over tasks outside ``vmap``. Results equal the functional engine's
(losses, adapted weights, meta-gradients): tested in float64 on every model body.

Modes (``grad_mode``):

* ``none`` (Reptile, evaluation): no graph; the history lives in preallocated buffers
  written in place, and the task-mean of the adapted weights (what Reptile needs) is one
  GEMM per layer over all tasks' history rows (``return_adapted="mean"``).
* ``first_order``: the history is made of constants (the inner gradients are detached),
  so it stays in the buffers; the losses keep their graph to the initial parameters and
  learned rates.
* ``second_order``: history rows carry the graph. Without checkpointing they are kept as a
  concatenated prefix plus a short list of recent rows (re-concatenated every ~sqrt(T)
  steps, so memory grows as T^1.5 rather than T^2). With ``checkpoint_segments`` the loop
  runs without a graph into the buffers, and backward recomputes one segment at a time from
  the saved small parameters and the history prefix (a slice of the final buffers), passing
  gradients of history rows back to the segments that wrote them: memory is one history
  plus its gradient plus one segment's graph. ``truncate_steps=k`` treats all but the last
  ``k`` updates as first-order, as in the functional engine.

Idle steps: a step whose elements are all padding for a task is a no-op for it (zero
loss, zero gradient). The engine sorts the tasks by their last step with a real element
(results come back in the caller's order), so the tasks still active at a step are a
prefix of the batch, and every step (with or without a graph) runs on that prefix only;
the idle tasks get zero history rows (written only where a reader needs them).

Limits (clear errors): plain SGD only; learned inner rates ``scalar`` or ``per_tensor``
(a ``per_parameter`` rate matrix does not factor out of the sum); each low-rank layer
must run once per forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call, vmap

from reptile_gen.inner_loop.core import (
    InnerLoopEngine,
    InnerLoopResult,
    LossFn,
    check_truncate_steps,
    first_order_before,
    first_visit,
    last_active_step,
    masked_mean,
    num_segments,
    sgd_step,
    split_rates,
)
from reptile_gen.inner_loop.lowrank_mlp import mlp_stepper

if TYPE_CHECKING:
    from reptile_gen.data.task_batch import TaskBatch
    from reptile_gen.inner_loop.core import InnerLR, InnerSchedule

__all__ = ["LowRankEngine", "LOWRANK_LR_MODES"]

#: learned inner learning rates the low-rank form can carry (one rate per weight tensor)
LOWRANK_LR_MODES = ("none", "scalar", "per_tensor")


def _check_learned(value: str) -> None:
    if value not in LOWRANK_LR_MODES:
        raise ValueError(
            f"algorithm.inner_lr_learned={value!r} with engine=lowrank: a "
            "per-parameter rate matrix does not factor out of the low-rank update; allowed: "
            f"{', '.join(LOWRANK_LR_MODES)} (or engine=functional)"
        )


class LowRankEngine(InnerLoopEngine):
    """Inner SGD with shared initial weights and per-task low-rank update histories.

    Args:
        chunk_size: tasks per pass of the inner loop (None: all at once); the passes run
            one after the other, bounding the history's memory.
        checkpoint_segments: second-order only: ``None`` (keep the graph), ``auto``
            (sqrt(T) segments recomputed in backward) or a segment count.
        truncate_steps: second-order only: differentiate through the last ``k`` inner
            updates (None: all).
        inner_lr_learned: the learned-rate mode the engine will be run with, checked when
            the engine is built (``none``, ``scalar`` or ``per_tensor``).
    """

    name = "lowrank"

    def __init__(
        self,
        chunk_size: int | None = None,
        checkpoint_segments: int | str | None = None,
        truncate_steps: int | None = None,
        inner_lr_learned: str = "none",
    ) -> None:
        num_segments(checkpoint_segments, 1)  # validates
        check_truncate_steps(truncate_steps)
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"engine.chunk_size={chunk_size!r}; allowed: null or an integer >= 1")
        _check_learned(inner_lr_learned)
        self.chunk_size = chunk_size
        self.checkpoint_segments = checkpoint_segments
        self.truncate_steps = truncate_steps

    @classmethod
    def from_options(cls, inner_optimizer, inner_optimizer_kwargs, options):
        cls.refuse_compile(cls.name, options)
        if inner_optimizer != "sgd" or inner_optimizer_kwargs:
            raise ValueError(
                f"engine.inner_optimizer={{name: {inner_optimizer}, {inner_optimizer_kwargs}}} "
                "with engine=lowrank: the low-rank engine runs plain SGD "
                "(inner_optimizer.name=sgd, no extra options); stateful inner optimizers "
                "need engine=higher"
            )
        options = {k: v for k, v in options.items() if k != "compile"}
        return cls(**options)

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
        _check_learned(lr.learned)
        if return_adapted not in (False, True, "mean"):
            raise ValueError(f"return_adapted={return_adapted!r}; allowed: False, True, 'mean'")
        # tasks sorted by their last step with a real element: the tasks still active at
        # a step are then a prefix of the batch, and the steps run on that prefix only
        order = _task_order(batch.support_mask, schedule)
        if order is not None:
            batch = batch[order]
        num_tasks = batch.num_tasks
        if self.chunk_size is None or num_tasks <= self.chunk_size:
            result = _Run(self, model, batch, loss_fn, lr, schedule, grad_mode).result(
                track_query, return_adapted
            )
        else:
            parts = []
            for i in range(0, num_tasks, self.chunk_size):
                chunk = batch[i : i + self.chunk_size]
                run = _Run(self, model, chunk, loss_fn, lr, schedule, grad_mode)
                parts.append(run.result(track_query, return_adapted))
            result = _concat_results(parts, num_tasks)
        return result if order is None else _reorder(result, torch.argsort(order))


def _task_order(mask: torch.Tensor, schedule: InnerSchedule) -> torch.Tensor | None:
    """Task order by last active step, descending (None: already in that order)."""
    last = last_active_step(mask, schedule.slices(mask.shape[1]))
    if last.numel() < 2 or bool((last[:-1] >= last[1:]).all()):
        return None
    return torch.argsort(last, descending=True, stable=True)


def _reorder(result: InnerLoopResult, index: torch.Tensor) -> InnerLoopResult:
    """``result`` with its per-task rows taken in ``index`` order."""

    def pick(t):
        return None if t is None else t[index]

    return InnerLoopResult(
        step_losses=pick(result.step_losses),
        element_losses=pick(result.element_losses),
        query_losses=pick(result.query_losses),
        adapted=None
        if result.adapted is None
        else {k: v[index] for k, v in result.adapted.items()},
        adapted_mean=result.adapted_mean,
    )


def _concat_results(parts: list[InnerLoopResult], num_tasks: int) -> InnerLoopResult:
    """One result from the results of consecutive task chunks."""

    def cat(field):
        values = [getattr(p, field) for p in parts]
        if values[0] is None:
            return None
        if isinstance(values[0], dict):
            return {k: torch.cat([v[k] for v in values]) for k in values[0]}
        return torch.cat(values)

    mean = None
    if parts[0].adapted_mean is not None:
        sizes = [p.step_losses.shape[0] for p in parts]
        mean = {
            k: sum(p.adapted_mean[k] * (n / num_tasks) for p, n in zip(parts, sizes))
            for k in parts[0].adapted_mean
        }
    return InnerLoopResult(
        step_losses=cat("step_losses"),
        element_losses=cat("element_losses"),
        query_losses=cat("query_losses"),
        adapted=cat("adapted"),
        adapted_mean=mean,
    )


# ------------------------------------------------------------------------ layers & hooks
@dataclass
class _Site:
    """A layer kept in low-rank form: its weight is shared, its updates are history rows."""

    name: str  # the weight's parameter name
    module: nn.Module
    embedding: bool
    rows: int = 0  # history rows one inner step adds (elements x leading dims)
    probe_shape: tuple[int, ...] = ()
    in_width: int = 0  # width of an input row (0: an embedding's index rows)
    out_width: int = 0


def _candidate_sites(model: nn.Module) -> list[_Site]:
    """Plain ``nn.Linear`` and ``nn.Embedding`` layers whose weight only they use.

    Subclasses may use their weight outside ``forward`` (``nn.MultiheadAttention``'s
    ``out_proj``), tied weights appear in two modules, and an embedding's padding row or
    max-norm renormalisation breaks the plain SGD update: those stay materialised.
    """
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    sites = []
    for mod_name, module in model.named_modules():
        kind = type(module)
        if kind is nn.Embedding:
            plain = (
                module.padding_idx is None
                and module.max_norm is None
                and not module.scale_grad_by_freq
                and not module.sparse
            )
            if not plain:
                continue
        elif kind is not nn.Linear:
            continue
        if owners[id(module.weight)] != 1 or not module.weight.requires_grad:
            continue
        name = f"{mod_name}.weight" if mod_name else "weight"
        sites.append(_Site(name, module, kind is nn.Embedding))
    return sites


class _Tape:
    """What the low-rank layers' hooks read and write during one (per-task) model call.

    ``pieces[i]``: history of site ``i`` as ``(A, D)`` pairs (rows of inputs or indices,
    and of output gradients); ``rates[i]``: its inner rate; ``probes[i]``: the zero added
    to its output (None: a call whose output gradients are not needed, e.g. the query).
    ``discover``: record shapes only (the first call of a run).
    """

    def __init__(self, pieces, rates, probes=None, discover: bool = False) -> None:
        self.pieces = pieces
        self.rates = rates
        self.probes = probes
        self.discover = discover
        n = len(rates)
        self.inputs: list[torch.Tensor | None] = [None] * n
        self.shapes: list[tuple | None] = [None] * n
        self.calls = [0] * n

    def apply(self, i: int, site: _Site, x: torch.Tensor, out: torch.Tensor):
        if self.calls[i]:
            raise RuntimeError(
                f"engine=lowrank: the layer of {site.name!r} ran twice in one "
                "forward pass; the low-rank form needs each nn.Linear/nn.Embedding to run "
                "once (use engine=functional for this model)"
            )
        self.calls[i] = 1
        if self.discover:
            self.shapes[i] = (tuple(x.shape), tuple(out.shape))
            return None
        correction = None
        for piece in self.pieces[i]:
            if len(piece) == 1:  # a folded (dense) delta of the weight, (dW,)
                dw = piece[0]
                if site.embedding:
                    c = torch.nn.functional.embedding(x, dw)
                else:
                    c = x @ dw.transpose(-1, -2)
            elif site.embedding:
                c = (x.unsqueeze(-1) == piece[0]).to(piece[1].dtype) @ piece[1]
            else:
                c = (x @ piece[0].transpose(-1, -2)) @ piece[1]
            correction = c if correction is None else correction + c
        if correction is not None:
            out = sgd_step(out, correction, self.rates[i])
        if self.probes is not None:
            out = out + self.probes[i]
            self.inputs[i] = (
                x.reshape(site.rows) if site.embedding else x.reshape(site.rows, site.in_width)
            )
        return out


# --------------------------------------------------------------------------- one run
@dataclass(frozen=True)
class _Step:
    start: int  # first element (in the padded support)
    count: int  # real elements of the schedule's slice
    record: bool  # its pre-update losses are the elements' online losses
    first_order: bool  # its inner gradients are constants


class _Env:
    """The tensors a run differentiates with respect to: the shared initial weights of
    the low-rank layers, and the learned inner rates (floats when fixed)."""

    def __init__(self, weights: list[torch.Tensor], rate_tensors: list[torch.Tensor], run):
        self.weights = weights
        self.rate_tensors = rate_tensors
        self.site_rates = [run.rate(n, rate_tensors) for n in run.site_names]
        self.small_rates = [run.rate(n, rate_tensors) for n in run.small_names]


class _Run:
    """One inner loop over a meta-batch (all the state of :meth:`LowRankEngine.run`)."""

    def __init__(self, engine, model, batch, loss_fn, lr, schedule, grad_mode) -> None:
        self.engine = engine
        self.model = model
        self.loss_fn = loss_fn
        self.buffers = dict(model.named_buffers())
        self.num_tasks = num_tasks = batch.num_tasks
        self.support_len = support_len = batch.support_x.shape[1]
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

        # the schedule, every step padded to the same element count (masked)
        slices = schedule.slices(support_len)
        records = first_visit(slices)
        num_steps = len(slices)
        n_first_order = first_order_before(num_steps, grad_mode, engine.truncate_steps)
        self.width = width = max((e - s for s, e in slices), default=1) or 1
        self.steps = [
            _Step(s, e - s, rec, i < n_first_order)
            for i, ((s, e), rec) in enumerate(zip(slices, records))
        ]
        self.num_steps = num_steps
        padded = max([s + width for s, _ in slices] + [support_len])
        self.sx, self.sy, self.mask = (
            _pad(batch.support_x, padded),
            _pad(batch.support_y, padded),
            _pad(batch.support_mask, padded),
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
        self.graph = torch.is_grad_enabled() and grad_mode != "none"
        self.grad_mode = grad_mode if self.graph else "none"
        self.segments = 1
        if self.grad_mode == "second_order":
            self.segments = num_segments(engine.checkpoint_segments, max(num_steps, 1))

        # low-rank layers: those the model calls (once) on a support step
        sites = _candidate_sites(model)
        self.sites = sites
        self.site_names = [s.name for s in sites]
        self.small_names = [n for n in self.param_names if n not in set(self.site_names)]
        self.tape: _Tape | None = None
        if sites and num_steps:
            x0 = self.sx[0, self.steps[0].start : self.steps[0].start + width]
            tape = _Tape([[] for _ in sites], [0.0] * len(sites), discover=True)
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
            used = [s for s, shapes in zip(sites, tape.shapes) if shapes is not None]
            if len(used) != len(sites):
                self.sites = sites = used
                self.site_names = [s.name for s in sites]
                self.small_names = [n for n in self.param_names if n not in set(self.site_names)]
        elif not num_steps:
            self.sites = sites = []
            self.site_names, self.small_names = [], list(self.param_names)

        # learned rates become explicit inputs (the checkpointed loop returns their
        # gradients); fixed ones stay floats
        rates = lr.rates_by_name()
        if not self.graph:
            rates = {k: (r.detach() if torch.is_tensor(r) else r) for k, r in rates.items()}
        self.rate_tensors, slots = split_rates(rates)
        self.rate_slots = {k: float(rates[k]) if i is None else i for k, i in slots.items()}
        weights = [params[n] for n in self.site_names]
        small = [params[n] for n in self.small_names]
        if not self.graph:
            weights = [w.detach() for w in weights]
            small = [p.detach() for p in small]
        self.env = _Env(weights, self.rate_tensors, self)
        self.small0 = [p.expand(num_tasks, *p.shape) for p in small]
        # the hand-written no-graph step of plain MLP models (None: the general step)
        self.fast = mlp_stepper(self) if self.sites else None

    # ------------------------------------------------------------------ helpers
    def rate(self, name: str, rate_tensors):
        slot = self.rate_slots[name]
        return slot if isinstance(slot, float) else rate_tensors[slot]

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

    def _call(self, tape: _Tape, params: dict, x: torch.Tensor) -> torch.Tensor:
        self.tape = tape
        try:
            for alias, name in self.aliases:
                params[alias] = params[name]
            return functional_call(self.model, (params, self.buffers), (x,), tie_weights=False)
        finally:
            self.tape = None

    def _params(self, env: _Env, small) -> dict:
        params = dict(zip(self.small_names, small))
        params.update(zip(self.site_names, env.weights))
        return params

    def step_data(self, step: _Step):
        sl = slice(step.start, step.start + self.width)
        x, y, m = self.sx[:, sl], self.sy[:, sl], self.mask[:, sl]
        if step.count < self.width:  # a short slice, filled up with masked elements
            m = m & (torch.arange(self.width, device=m.device) < step.count)
        return x, y, m

    def _rows(self, step_index: int) -> list[int]:
        return [step_index * s.rows for s in self.sites]

    # -------------------------------------------------------------- vmapped pieces
    def step(self, env: _Env, small, pieces, x, y, m, keep_graph: bool, differentiable: bool):
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
        """
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
            probes_t, (x_t, y_t, m_t) = rest[k:-3], rest[-3:]
            tape = _Tape(pieces_t, env.site_rates, probes_t)
            out = self._call(tape, self._params(env, small_t), x_t)
            elements = self.loss_fn(out, y_t)
            loss = masked_mean(elements, m_t)
            return (loss, elements * m_t.to(elements.dtype), *tape.inputs)

        flat_pieces = [t for site_pieces in pieces for pair in site_pieces for t in pair]
        with torch.enable_grad():
            losses, elements, *inputs = vmap(one_task, randomness="different")(
                *small, *flat_pieces, *probes, x, y, m
            )
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

    def query_loss(self, env: _Env, small, pieces) -> torch.Tensor:
        """``[B]`` mean query loss of each task at ``small`` and history ``pieces``."""

        def one_task(small, pieces, qx, qy):
            tape = _Tape(pieces, env.site_rates)
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
        for i in steps:
            if snapshots is not None and i in snapshots:
                snapshots[i] = [p.clone() for p in small]
            step = self.steps[i]
            rows = self._rows(i)
            n = self.active[i]  # the tasks [n:] have only padding left: no-op steps
            elements = torch.zeros(0, self.width, dtype=self.dtype, device=self.device)
            if n:
                x, y, m = (t[:n] for t in self.step_data(step))
                pieces = [[(a[:n, :r], d[:n, :r])] if r else [] for (a, d), r in zip(history, rows)]
                part = [p[:n] for p in small] if n < b else small
                if self.fast is not None and not keep_graph:
                    g_small, deltas, elements, inputs = self.fast.step(env, part, pieces, x, y, m)
                else:
                    g_small, deltas, elements, inputs = self.step(
                        env, part, pieces, x, y, m, keep_graph, False
                    )
                for (wa, wd), r, s, a, d in zip(writers, rows, self.sites, inputs, deltas):
                    wa[:n, r : r + s.rows] = a.detach()
                    wd[:n, r : r + s.rows] = d.detach()
                if in_place:
                    for p, g, rate in zip(small, g_small, env.small_rates):
                        sgd_step(p[:n], g, rate, "inplace")
                else:
                    small = [
                        _update_prefix(p, g.detach(), rate, n)
                        for p, g, rate in zip(small, g_small, env.small_rates)
                    ]
            elements = _pad_tasks(elements, b)
            outs.add(self, step, elements)
            if outs.track_query:
                self.idle_tails(history, i + 1, since=i)
                upto = [r + s.rows for r, s in zip(rows, self.sites)]
                pieces = [[(a[:, :r], d[:, :r])] for (a, d), r in zip(history, upto)]
                outs.queries.append(self.query_loss(env, small, pieces))
        if tails and steps:
            self.idle_tails(history, steps[-1] + 1)
        return small

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
                    _update_prefix(p, g, rate, k)
                    for p, g, rate in zip(small, g_small, env.small_rates)
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
                elements, *deltas = (_pad_tasks(t, b) for t in (elements, *deltas))
                inputs = [_pad_tasks(t, b) for t in inputs]
            for j in range(n):
                local[j].append((inputs[j], deltas[j]))
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
            outs = _Outputs(track)
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
                small = self.buffered(env, self.small0, range(fo), history, outs, True)
                rows = self._rows(fo)
                base = [[(a[:, :r], d[:, :r])] if r else [] for (a, d), r in zip(history, rows)]
                pieces = base
                if fo < self.num_steps:
                    block = max(1, math.ceil(math.sqrt(self.num_steps - fo)))
                    small, new = self.with_graph(
                        env, small, base, range(fo, self.num_steps), block, outs
                    )
                    pieces = [list(p) + ([r] if r is not None else []) for p, r in zip(base, new)]
                steps_t, elements_t, queries_t = outs.stacked(self)
            else:
                bounds = [
                    round(k * self.num_steps / self.segments) for k in range(self.segments + 1)
                ]
                ns, nsite = len(self.small_names), len(self.sites)
                res = _CheckpointedLoop.apply(
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

    def live_rows(self, site: _Site, a: torch.Tensor, d: torch.Tensor):
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

    def adapted(self, env: _Env, small, pieces, mean: bool) -> dict[str, torch.Tensor]:
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


class _Outputs:
    """Per-step losses collected by the loops."""

    def __init__(self, track_query: bool) -> None:
        self.track_query = track_query
        self.step_losses: list[torch.Tensor] = []
        self.elements: list[torch.Tensor] = []
        self.queries: list[torch.Tensor] = []

    def add(self, run: _Run, step: _Step, elements: torch.Tensor) -> None:
        _, _, m = run.step_data(step)
        count = m.sum(1).clamp(min=1).to(elements.dtype)
        self.step_losses.append(elements.sum(1) / count)
        self.elements.append(elements)

    def stacked(self, run: _Run):
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


class _CheckpointedLoop(torch.autograd.Function):
    """Second-order inner loop recomputed segment by segment in backward.

    Forward runs every step without a graph, writing the history into buffers, and keeps
    the small parameters at each segment's start. Backward walks the segments in reverse:
    it reruns one with its graph from its saved small parameters and the history prefix
    (a slice of the final buffers, made a leaf), and backpropagates into them the
    gradients of the segment's outputs: its losses, its small parameters at the end (from
    the later segments) and its history rows (accumulated from every later segment that
    read them). The prefix's gradient is added to the rows of earlier segments.

    Inputs: the shared weights, the initial (expanded) small parameters, the learned rate
    tensors. Outputs: step losses ``[B, T]``, element losses ``[B, T, width]``, tracked
    query losses ``[B, T]`` (or ``[B, 0]``), final small parameters, history ``A`` then
    ``D`` per site.
    """

    @staticmethod
    def forward(ctx, run: _Run, bounds: list[int], track: bool, *tensors):
        nw, ns = len(run.sites), len(run.small_names)
        weights, small0, rates = tensors[:nw], tensors[nw : nw + ns], tensors[nw + ns :]
        # no graph in forward: detached inputs (backward recomputes with the real ones)
        env = _Env([w.detach() for w in weights], [r.detach() for r in rates], run)
        history = run.new_history()
        snapshots = {b: None for b in bounds[1:-1]}
        outs = _Outputs(track)
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
        run: _Run = ctx.run
        nw, ns = len(run.sites), len(run.small_names)
        saved = ctx.saved_tensors
        nt = len(saved) - 2 * nw
        tensors, a_hist, d_hist = saved[:nt], saved[nt : nt + nw], saved[nt + nw :]

        def leaf(t):
            return t.detach().requires_grad_(t.requires_grad)

        weights = [leaf(t) for t in tensors[:nw]]
        rates = [leaf(t) for t in tensors[nw + ns :]]
        env = _Env(weights, rates, run)
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

        def add(acc, g):
            return g if acc is None else (acc if g is None else acc + g)

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
                        base.append([_fold(s, w, pa, pd) if _folds(s, w, r) else (pa, pd)])
                        prefix_leaves.append((pa, pd))
                    else:
                        base.append([])
                        prefix_leaves.append(None)
            outs = _Outputs(ctx.track)
            with torch.enable_grad(), run.hooks():
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
            pairs = [(o, g) for o, g in pairs if g is not None and o.requires_grad]
            wanted = list(small)
            for pl in prefix_leaves:
                if pl is not None:
                    wanted += [t for t in pl if t.requires_grad]
            wanted += [t for t in weights + rates if t.requires_grad]
            grads = torch.autograd.grad(
                [o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True
            )
            it = iter(grads)
            g_small = [next(it) for _ in small]
            for j, (s, pl) in enumerate(zip(run.sites, prefix_leaves)):
                if pl is None:
                    continue
                if not s.embedding:
                    ga = next(it)
                    if ga is not None:
                        g_a[j][:, : r0[j]] += ga
                gd = next(it)
                if gd is not None:
                    g_d[j][:, : r0[j]] += gd
            for idx, t in enumerate(weights):
                if t.requires_grad:
                    g_weights[idx] = add(g_weights[idx], next(it))
            for idx, t in enumerate(rates):
                if t.requires_grad:
                    g_rates[idx] = add(g_rates[idx], next(it))
        return (None, None, None, *g_weights, *g_small, *g_rates)


def _folds(site: _Site, weight: torch.Tensor, rows: int) -> bool:
    """Whether ``rows`` history rows cost more per use than a dense per-task weight delta
    (``rows * (in + out)`` against ``in * out`` numbers read, and the same written as
    gradient at every step of a recomputed segment)."""
    if site.embedding:
        return rows * (1 + site.out_width) > weight.numel()
    return rows * (site.in_width + site.out_width) > weight.numel()


def _fold(site: _Site, weight: torch.Tensor, a: torch.Tensor, d: torch.Tensor) -> tuple:
    """History rows ``(A [B, r, in], D [B, r, out])`` as one dense per-task delta
    ``(D^T A,)`` of the weight's shape (for an embedding: ``D`` summed into the rows ``A``
    index), made with the graph, so the rows' gradient comes back through one GEMM per
    segment instead of a dense ``[B, r, width]`` gradient at every step."""
    if site.embedding:
        out = torch.zeros(a.shape[0], *weight.shape, dtype=d.dtype, device=d.device)
        return (out.scatter_add(1, a.unsqueeze(-1).expand(-1, -1, d.shape[-1]), d),)
    return (torch.bmm(d.transpose(1, 2), a),)


def _pad_tasks(t: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """``t`` (``[k, ...]``, the active tasks) with zero rows for the idle tasks after it."""
    missing = num_tasks - t.shape[0]
    return t if missing <= 0 else torch.cat([t, t.new_zeros(missing, *t.shape[1:])])


def _update_prefix(p: torch.Tensor, g: torch.Tensor, rate, n: int) -> torch.Tensor:
    """``p`` with the SGD step ``rate * g`` taken by its first ``n`` tasks (out of place)."""
    if n == p.shape[0]:
        return sgd_step(p, g, rate)
    return torch.cat([sgd_step(p[:n], g, rate), p[n:]])


def _pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """``t`` (``[B, S, ...]``) zero-padded along dim 1 to ``length`` (zeros are valid
    inputs of every encoder and targets of every loss; the mask pads with False)."""
    missing = length - t.shape[1]
    if missing <= 0:
        return t
    return torch.cat([t, t.new_zeros((t.shape[0], missing, *t.shape[2:]))], 1)
