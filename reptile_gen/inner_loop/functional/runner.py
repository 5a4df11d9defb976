"""The batched runner of the functional engine: every task's parameters as one batched tensor.

The generic ``torch.func`` form (``vmap`` over tasks of ``grad`` of a ``functional_call``)
pays, at every inner step, for two transform layers wrapped around each op, pytree
flattening and module attribute swaps, and its second-order graph is a double backward
through ``vmap``'s batching rules. Profiling sine MAML (25 tasks, K=10, MLP 40x40) on one
thread showed most of a meta-step in that per-op overhead, not in arithmetic. Here the
parameters of all tasks are ``[B, ...]`` tensors and the inner step is written for the
whole batch at once:

* **forward**: a model made only of known modules (:func:`compile_model`) runs as
  batched ops (``Linear`` -> ``baddbmm``; a weight still shared by all tasks, as at the
  first inner step, -> one ``linear`` over all tasks' inputs). Any other model runs
  ``vmap(functional_call)`` for the forward only.
* **inner gradient**, two ways:

  - *analytic* (every layer has a hand-written backward: ``Linear``, elementwise
    activations, ``SineLayer``, the input encoders; i.e. the ``mlp``, ``text_mlp`` and
    ``siren`` models): the loss's gradient w.r.t. the prediction comes from autograd
    (so any loss works), and backpropagation through the layers is written out as
    ordinary batched ops (``bmm`` for weight gradients, the ``aten`` backward kernels
    autograd itself uses for the activations). The outer backward of second-order MAML
    is then a first-order backward through ordinary ops: no double backward at all.
  - *autograd* (everything else, e.g. LSTM blocks with LayerNorm, gated MLPs, unknown
    modules): ``torch.autograd.grad`` of the sum over tasks of each task's loss w.r.t.
    the batched parameters. Tasks are independent, so the gradient w.r.t. task ``b``'s
    slice is task ``b``'s own gradient: one autograd call for the whole meta-batch.

Updates are one op per tensor (``add`` with ``alpha``, ``addcmul`` for learned rates).
Every path computes what the generic path does (float64 parity tests).
"""

from __future__ import annotations

import torch
from torch.func import functional_call, vmap

from reptile_gen.inner_loop.core import (
    RateSlots,
    StepRates,
    momentum_step,
    sgd_step,
    step_weights,
)
from reptile_gen.inner_loop.core.losses import closed_form_loss
from reptile_gen.inner_loop.core.model_plan import BatchedModel
from reptile_gen.inner_loop.functional import second_order as reverse_pass

__all__ = ["BatchedRunner"]


class BatchedRunner:
    """Runs a stretch of inner steps for all tasks at once on ``[B, ...]`` parameters
    (same interface as the generic ``vmap`` runner of :mod:`.segments`).

    Args:
        model: the ``nn.Module`` (its parameters are replaced by the batched ones).
        names: parameter names, in the order the parameter lists follow.
        loss_fn: ``(pred, target) -> [...]`` per-element loss.
        rates: ``{name: float or tensor}`` inner learning rates.
        chunk_size: tasks per chunk (None: all at once).
        track_query: evaluate the query loss after every step.
        path: ``analytic``, ``autograd`` (hand-batched forward, autograd inner
            gradient) or ``vmap`` (``vmap(functional_call)`` forward, autograd inner
            gradient).
        batched: the compiled model (needed by ``analytic`` and ``autograd``).
        step_rates: the run's :class:`~reptile_gen.inner_loop.core.StepRates` (scheduled or
            per-step learned rates; None: the same rates at every step).
        momentum: the inner step's heavy-ball momentum (0: plain SGD). With momentum the
            state a segment carries is the parameters, then their velocities (same
            shapes), and the autograd graph of the same ops replaces the hand-written
            reverse pass (which differentiates plain SGD steps).
    """

    def __init__(
        self,
        model,
        names,
        loss_fn,
        rates,
        chunk_size,
        track_query,
        path: str,
        batched: BatchedModel | None,
        hand_backward: bool = True,
        step_rates: StepRates | None = None,
        momentum: float = 0.0,
    ) -> None:
        self.momentum = momentum
        self.model = model
        self.names = names
        self.loss_fn = loss_fn
        self.slots = RateSlots(rates, step_rates)
        self.rate_tensors = self.slots.tensors
        self.chunk_size = chunk_size
        self.track_query = track_query
        self.path = path
        self.batched = batched
        self.buffers = dict(model.named_buffers()) if path == "vmap" else {}
        self.loss_grad = closed_form_loss(loss_fn) if path == "analytic" else None
        #: the hand-written reverse pass (:mod:`.second_order`) replaces the autograd graph
        self.hand = (
            reverse_pass
            if hand_backward and reverse_pass.supports(batched, self.loss_grad)
            else None
        )  # fmt: skip
        #: the hand-written reverse pass of whole segments (plain SGD steps only)
        self.hand_segments = self.hand is not None and not momentum

    # -------------------------------------------------------------- forward
    def forward(self, params: list, x: torch.Tensor, keep: bool = False, share: bool = True):
        """Batched predictions ``[B, n, out]`` (and saved tensors with ``keep``; see
        :meth:`BatchedModel.forward` for ``share``)."""
        if self.batched is not None and self.path != "vmap":
            return self.batched.forward(dict(zip(self.names, params)), x, keep, share)

        def one(x, *p):
            return functional_call(self.model, (dict(zip(self.names, p)), self.buffers), (x,))

        return vmap(one)(x, *params), None

    def query_losses(self, params, query) -> torch.Tensor:
        """``[B]`` query loss at batched ``params``."""
        return self._chunked(lambda p, q: self._query(p, q), params, query)

    def _query(self, params, query):
        qx, qy = query
        if self.hand is not None and torch.is_grad_enabled() and _needs_grad(params):
            return self.hand.HandQuery.apply(self, qx, qy, *params)
        return self.loss_fn(self.forward(params, qx)[0], qy).mean(1)

    def _chunked(self, fn, params, query):
        if self.chunk_size is None or params[0].shape[0] <= self.chunk_size:
            return fn(params, query)
        out = []
        for lo in range(0, params[0].shape[0], self.chunk_size):
            hi = lo + self.chunk_size
            out.append(fn([p[lo:hi] for p in params], tuple(q[lo:hi] for q in query)))
        return torch.cat(out)

    def rates(self, rate_tensors, step: int | None = None) -> dict:
        """``{name: rate}`` with the learned rates taken from ``rate_tensors`` (the base
        rates, or with ``step`` that step's rates)."""
        return self.slots.rates(rate_tensors, step)

    # -------------------------------------------------------------- one step
    def _step_grads(self, params, x, y, weights, graph: bool, second_order: bool):
        """``(grads, elements)`` of one inner step: the gradients of each task's
        weighted loss ``sum_i w_i * loss_i`` w.r.t. its parameters (with a graph iff
        ``second_order``), and the per-element losses (attached to the outer graph iff
        ``graph``)."""
        if self.path == "analytic":
            p = dict(zip(self.names, params))
            pred, saved = self.batched.forward(p, x, keep=True)
            if self.loss_grad is not None:
                elements, g = self.loss_grad.loss_and_grad(pred, y)
                with torch.set_grad_enabled(second_order):
                    d = g * weights.unsqueeze(-1)
            else:  # any other loss: its gradient w.r.t. the prediction from autograd
                with torch.enable_grad():
                    leaf = pred if graph and pred.requires_grad else pred.detach().requires_grad_()
                    elements = self.loss_fn(leaf, y)
                    (d,) = torch.autograd.grad(
                        (elements * weights).sum(), leaf, create_graph=second_order,
                        retain_graph=True,
                    )  # fmt: skip
            with torch.set_grad_enabled(second_order):
                grads = self.batched.backward(p, d, saved)
            return [grads[n] for n in self.names], elements if graph else elements.detach()
        with torch.enable_grad():
            inputs = [
                p if graph and p.requires_grad else p.detach().requires_grad_() for p in params
            ]
            elements = self.loss_fn(self.forward(inputs, x, share=False)[0], y)
            grads = torch.autograd.grad(
                (elements * weights).sum(),
                inputs,
                create_graph=second_order,
                retain_graph=graph,
                allow_unused=True,
            )
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        return grads, elements if graph else elements.detach()

    def segment(self, steps, query, data, params, rate_tensors):
        """Run ``steps`` (``(start, end, record, first_order, index)`` each) from batched
        ``params`` (with momentum: the parameters, then their velocities); returns the
        new params (and velocities), ``[B, n]`` step losses, ``[B, e]`` element losses of
        the recorded steps and ``[B, n]`` query losses (if tracked)."""
        if self.chunk_size is None or params[0].shape[0] <= self.chunk_size:
            return self._segment(steps, query, data, params, rate_tensors)
        pieces = []
        for lo in range(0, params[0].shape[0], self.chunk_size):
            hi = lo + self.chunk_size
            pieces.append(
                self._segment(
                    steps,
                    None if query is None else tuple(q[lo:hi] for q in query),
                    tuple(t[lo:hi] for t in data),
                    [p[lo:hi] for p in params],
                    rate_tensors,
                )
            )
        return tuple(torch.cat(parts) for parts in zip(*pieces))

    def _segment(self, steps, query, data, params, rate_tensors):
        track_query = self.track_query and query is not None
        per_step = self.slots.steps is not None
        rates = [self.rates(rate_tensors)[n] for n in self.names]
        sx, sy, sm = data
        grad_on = torch.is_grad_enabled()
        graph = grad_on and (_needs_grad(params) or _needs_grad(rate_tensors))
        n = len(self.names)
        params, velocity = params[:n], (params[n:] if self.momentum else [])
        if self.hand_segments and graph and not track_query and steps:
            return self.hand.HandSegment.apply(
                self, steps, data, len(params), *params, *rate_tensors
            )
        step_losses, element_losses, query_losses = [], [], []
        for start, end, record, first_order, index in steps:
            x, y = sx[:, start:end], sy[:, start:end]
            mask, weights = step_weights(sm, start, end, params[0].dtype)
            if per_step:
                step_rates = self.rates(rate_tensors, index)
                rates = [step_rates[n] for n in self.names]
            grads, elements = self._step_grads(
                params, x, y, weights, graph, second_order=graph and not first_order
            )
            step_losses.append((elements * weights).sum(1))
            if record:
                element_losses.append(elements * mask)
            if first_order:
                grads = [g.detach() for g in grads]
            if self.momentum:
                active = mask.sum(1) > 0
                active = None if bool(active.all()) else active  # no padding-only task
                stepped = [
                    momentum_step(p, v, g, r, self.momentum, active, "fused")
                    for p, v, g, r in zip(params, velocity, grads, rates)
                ]
                params, velocity = [s[0] for s in stepped], [s[1] for s in stepped]
            else:
                params = [sgd_step(p, g, r, "fused") for p, g, r in zip(params, grads, rates)]
            if track_query:
                query_losses.append(self._query(params, query))
        num_tasks = sx.shape[0]
        zero = sx.new_zeros((num_tasks, 0), dtype=params[0].dtype)
        return (
            *params,
            *velocity,
            torch.stack(step_losses, 1) if step_losses else zero,
            torch.cat(element_losses, 1) if element_losses else zero,
            torch.stack(query_losses, 1) if query_losses else zero,
        )


def _needs_grad(tensors) -> bool:
    return any(t.requires_grad for t in tensors)
