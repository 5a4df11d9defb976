"""A hand-written inner step of the low-rank engine for the plain MLP models.

For ``SequenceModel(encoder, MLP, head)`` (encoder: continuous features or embedding
tables; MLP: ``nn.Linear`` layers with ReLU or Tanh; head: ``nn.Linear``; read off the
shared model plan), one inner step
of every task without a graph (Reptile, evaluation, the checkpointed forward) is written
out: the forward pass is one matmul per layer with the shared initial weight plus the
history's correction, and the backward pass is the same on the transpose, so no ``vmap``,
``functional_call``, hooks or autograd graph run per step (autograd differentiates only
the loss with respect to the logits, per task under ``vmap`` as in the general step). It
returns what :meth:`.run.Run.step` returns, so the engine's history, updates and results are
unchanged; tested in float64 against the functional engine (tests/inner_loop/test_lowrank_engine.py).
On text Reptile (50 x 128, 7x512) it takes ~12% off a meta-step, the per-step overhead.

Any other model (or a mismatch found when the plan is built) keeps the general step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import record_function

from reptile_gen.inner_loop.core import sgd_step
from reptile_gen.inner_loop.core.layers import Activation, Embeddings, Identity, Linear
from reptile_gen.inner_loop.core.model_plan import compile_model
from reptile_gen.inner_loop.lowrank.state import step_losses
from reptile_gen.models import SequenceModel

__all__ = ["MLPStepper", "mlp_stepper"]

#: activations whose derivative is read off their output
_ACTIVATIONS = {nn.ReLU: "relu", nn.Tanh: "tanh"}


@dataclass
class _Layer:
    site: int  # index of its weight among the run's sites
    bias: int | None  # index of its bias among the run's small parameters
    activation: str | None  # after the layer (None: the head)


def mlp_stepper(run) -> MLPStepper | None:
    """The hand-written step for ``run`` (a :class:`~reptile_gen.inner_loop.lowrank.run.Run`),
    or None when its model is not a plain MLP sequence model in low-rank form.

    The layers are read off the shared model plan
    (:func:`~reptile_gen.inner_loop.core.model_plan.compile_model`): an encoder (continuous
    or embedding tables), then ``Linear`` layers, each followed by ReLU, Tanh or nothing,
    the last by nothing; every weight a site, every bias a small parameter."""
    if type(run.model) is not SequenceModel:
        return None
    batched = compile_model(run.model, run.param_names)
    if batched is None or not batched.layers:
        return None
    site_of = {s.name: i for i, s in enumerate(run.sites)}
    small_of = {name: i for i, name in enumerate(run.small_names)}
    encoder, *chain = batched.layers
    tables: list[int] = []
    if isinstance(encoder, Embeddings):
        if any(name not in site_of for name in encoder.params):
            return None
        tables = [site_of[name] for name in encoder.params]
        if len({run.sites[j].module.embedding_dim for j in tables}) != 1:
            return None  # the step splits the input gradient into equal widths
    elif not isinstance(encoder, Identity):
        return None
    layers: list[_Layer] = []
    for layer in chain:
        if isinstance(layer, Activation):
            kind = _ACTIVATIONS.get(layer.kind)
            if kind is None or not layers or layers[-1].activation is not None:
                return None
            layers[-1].activation = kind
        elif isinstance(layer, Linear) and layer.w in site_of:
            if layer.b is not None and layer.b not in small_of:
                return None
            bias = None if layer.b is None else small_of[layer.b]
            layers.append(_Layer(site_of[layer.w], bias, None))
        else:
            return None
    if not layers or layers[-1].activation is not None:
        return None
    used_small = {layer.bias for layer in layers if layer.bias is not None}
    if len(used_small) != len(run.small_names):
        return None
    if len({layer.site for layer in layers} | set(tables)) != len(run.sites):
        return None
    rows = {s.rows for s in run.sites}
    if len(rows) != 1:
        return None
    return MLPStepper(run, tables, layers, rows.pop())


class MLPStepper:
    """One no-graph inner step of every (active) task, written out for a plain MLP."""

    def __init__(self, run, tables: list[int], layers: list[_Layer], rows: int):
        self.run = run
        self.tables = tables
        self.layers = layers
        self.rows = rows

    def _correct(self, out, x, pieces, rate, embedding: bool):
        """``out`` minus ``rate`` times the history's correction at inputs ``x``."""
        with record_function("lowrank.history"):
            return self._history(out, x, pieces, rate, embedding)

    def _history(self, out, x, pieces, rate, embedding: bool):
        for piece in pieces:
            if len(piece) == 1:  # a folded (dense) delta of the weight
                dw = piece[0]
                if embedding:
                    c = torch.gather(dw, 1, x.unsqueeze(-1).expand(-1, -1, dw.shape[-1]))
                else:
                    c = torch.bmm(x, dw.transpose(1, 2))
            elif embedding:
                c = torch.bmm((x.unsqueeze(-1) == piece[0].unsqueeze(1)).to(out.dtype), piece[1])
            else:
                c = torch.bmm(torch.bmm(x, piece[0].transpose(1, 2)), piece[1])
            out = sgd_step(out, c, rate, "inplace")
        return out

    def _grad_input(self, delta, weight, pieces, rate):
        g = torch.matmul(delta, weight)
        with record_function("lowrank.history"):
            return self._grad_history(g, delta, pieces, rate)

    def _grad_history(self, g, delta, pieces, rate):
        """``g`` plus ``delta`` (``[n, R, out]``) through the history's transpose."""
        for piece in pieces:
            if len(piece) == 1:
                c = torch.bmm(delta, piece[0])
            else:
                c = torch.bmm(torch.bmm(delta, piece[1].transpose(1, 2)), piece[0])
            g = sgd_step(g, c, rate, "inplace")
        return g

    @torch.no_grad()
    def step(self, env, small, pieces, x, y, m, choose=None):
        """``(small grads, deltas, elements, inputs)`` as :meth:`.run.Run.step` returns them
        with ``keep_graph=False`` (everything detached); ``choose`` as there."""
        if self.run.engine.on_step is not None:
            self.run.engine.on_step("fast", x.shape[0])
        run, n = self.run, x.shape[0]
        inputs: list = [None] * len(run.sites)
        deltas: list = [None] * len(run.sites)
        with record_function("lowrank.forward"):
            h, acts = self._forward(env, small, pieces, x, n, inputs)
        with record_function("lowrank.probe_grads"):
            g, weighted = self._loss_grad(h, y, m, n, choose)
        with record_function("lowrank.step_backward"):
            g_small = self._backward(env, small, pieces, g, acts, inputs, deltas)
        return g_small, deltas, weighted.detach(), inputs

    def _forward(self, env, small, pieces, x, n, inputs):
        """The encoder and the layers: the logits and every layer's input."""
        run, rows, weights, rates = self.run, self.rows, env.weights, env.site_rates
        if self.tables:
            idx = x
            if idx.dim() == 1 or idx.shape[-1] != len(self.tables):
                idx = idx.unsqueeze(-1)
            idx = idx.long()
            parts = []
            for k, j in enumerate(self.tables):
                ik = idx[..., k].reshape(n, rows)
                h = nn.functional.embedding(ik, weights[j])
                parts.append(self._correct(h, ik, pieces[j], rates[j], True))
                inputs[j] = ik
            h = torch.cat(parts, -1) if len(parts) > 1 else parts[0]
        else:
            h = x.reshape(n, rows, -1).to(run.dtype)
        # ---- forward
        acts = []
        for layer in self.layers:
            acts.append(h)
            j = layer.site
            z = torch.matmul(h, weights[j].T)
            if layer.bias is not None:
                z = z.add_(small[layer.bias].unsqueeze(1))
            z = self._correct(z, h, pieces[j], rates[j], False)
            if layer.activation == "relu":
                h = z.clamp_min_(0)
            elif layer.activation == "tanh":
                h = z.tanh_()
            else:
                h = z
        return h, acts

    def _loss_grad(self, h, y, m, n, choose=None):
        """The element losses (masked) and the loss gradient at the logits, per task
        under ``vmap`` as in the general step."""
        run = self.run
        out_shape = run.sites[self.layers[-1].site].probe_shape
        logits = h.reshape(n, *out_shape)
        if choose is not None:
            y, m = choose(logits.detach(), y, m)
        with torch.enable_grad():
            logits.requires_grad_(True)
            losses, weighted = step_losses(run.loss_fn, logits, y, m)
            (g,) = torch.autograd.grad(losses.sum(), logits)
        return g.reshape(n, self.rows, -1), weighted

    def _backward(self, env, small, pieces, g, acts, inputs, deltas):
        """The output gradients of every layer (``deltas``) and the small parameters'."""
        run, weights, rates = self.run, env.weights, env.site_rates
        g_small: list = [None] * len(run.small_names)
        for li in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[li]
            j = layer.site
            deltas[j] = g
            inputs[j] = acts[li]
            if layer.bias is not None:
                g_small[layer.bias] = g.sum(1).reshape(small[layer.bias].shape)
            if li == 0 and not self.tables:
                break
            g = self._grad_input(g, weights[j], pieces[j], rates[j])
            if li > 0:
                a = acts[li]
                if self.layers[li - 1].activation == "relu":
                    g = g.mul_(a > 0)
                else:
                    g = g.mul_(1 - a * a)
        if self.tables:
            width = g.shape[-1] // len(self.tables)
            for k, j in enumerate(self.tables):
                deltas[j] = g[..., k * width : (k + 1) * width]
        return g_small
