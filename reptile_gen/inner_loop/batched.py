"""Fast paths of the functional engine: every task's parameters as one batched tensor.

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

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from reptile_gen.inner_loop.core import RateSlots, sgd_step, step_weights
from reptile_gen.inner_loop.core.losses import closed_form_loss
from reptile_gen.models import SequenceModel
from reptile_gen.models.bodies import (
    MLP,
    GatedLinear,
    GatedMLP,
    LayerNorm,
    LSTMBlock,
    LSTMBlockStack,
    SineLayer,
    Siren,
)
from reptile_gen.models.encoders import ContinuousEncoder, DiscreteEncoder

__all__ = ["BatchedModel", "compile_model", "BatchedRunner", "closed_form_loss"]


def _shared(t: torch.Tensor) -> bool:
    """Whether every task's slice of ``t`` is the same memory (a broadcast view of the
    shared initial parameters, as before the first inner step)."""
    return t.dim() > 0 and t.stride(0) == 0


def _matmul(h: torch.Tensor, w: torch.Tensor, transpose: bool) -> torch.Tensor:
    """``h @ w[b]`` (``w[b].T`` with ``transpose``) per task, one ``matmul`` when all
    tasks share ``w``."""
    if _shared(w):
        w0 = w[0]
        return torch.matmul(h, w0.t() if transpose else w0)
    return _bmm(h, w.transpose(1, 2) if transpose else w)


def _bmm(a: torch.Tensor, b: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """``bmm`` (plus ``add``, if given, in the same op), as a broadcast product when the
    contracted size is 1 (a 1-input or 1-output layer: ``bmm`` of an outer product is
    several times slower)."""
    if a.shape[2] == 1:
        return a * b if add is None else torch.addcmul(add, a, b)
    if add is None:
        return torch.bmm(a, b)
    return torch.baddbmm(add, a, b)


def _bmm_tn(d: torch.Tensor, h: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """``d[b].T @ h[b]`` per task (a weight gradient; plus ``add`` if given). For a
    1-input layer it is computed as the transpose of ``h[b].T @ d[b]``: ``bmm`` is several
    times faster with the width-1 side first."""
    flip = h.shape[2] == 1 and d.shape[2] != 1
    a, b = (h.transpose(1, 2), d) if flip else (d.transpose(1, 2), h)
    if add is None:
        out = torch.bmm(a, b)
    else:
        out = torch.baddbmm(add.transpose(1, 2) if flip else add, a, b)
    return out.transpose(1, 2) if flip else out


# ------------------------------------------------------------------------------ layers
class _Layer:
    """One batched layer. ``forward`` returns the output and what ``backward`` needs;
    ``backward`` (analytic layers only) writes the parameter gradients into ``grads``
    and returns the gradient w.r.t. the input (None if ``need_input`` is False)."""

    analytic = False
    #: has the R-operators (``tangent``, ``rbackward``) of the hand-written second-order
    #: reverse pass (:mod:`.second_order`)
    rop = False
    params: tuple[str, ...] = ()

    def forward(self, p: dict, h: torch.Tensor, share: bool):
        raise NotImplementedError

    def backward(self, p: dict, d: torch.Tensor, saved, grads: dict, need_input: bool):
        raise NotImplementedError

    def tangent(self, p: dict, v: dict | None, r: torch.Tensor | None, saved):
        """Forward-mode derivative: the output's tangent given the input's ``r`` and the
        parameters' ``v`` (None: zero). Returns ``(r_out, rsaved)``."""
        raise NotImplementedError

    def rbackward(self, p, v, d, rd, saved, rsaved, rgrads: dict, need_input: bool):
        """Tangent of :meth:`backward`: given the output gradient ``d`` it had and that
        gradient's tangent ``rd``, adds the parameter gradients' tangents to ``rgrads``
        and returns the input gradient's tangent."""
        raise NotImplementedError


class _Linear(_Layer):
    analytic = True

    def __init__(self, prefix: str, module: nn.Linear) -> None:
        self.w = f"{prefix}weight"
        self.b = f"{prefix}bias" if module.bias is not None else None
        self.params = (self.w,) if self.b is None else (self.w, self.b)

    def forward(self, p, h, share):
        w = p[self.w]
        b = p[self.b] if self.b is not None else None
        if share and _shared(w) and (b is None or _shared(b)):
            # one weight for all tasks: a single matmul over all tasks' inputs
            out = F.linear(h, w[0], None if b is None else b[0])
        else:
            out = _bmm(h, w.transpose(1, 2), add=None if b is None else b.unsqueeze(1))
        return out, h

    def backward(self, p, d, h, grads, need_input):
        grads[self.w] = _bmm_tn(d, h)
        if self.b is not None:
            grads[self.b] = d.sum(1)
        if not need_input:
            return None
        return _matmul(d, p[self.w], transpose=False)

    rop = True

    def tangent(self, p, v, r, h):
        out = None if r is None else _matmul(r, p[self.w], transpose=True)
        if v is not None:
            out = _bmm(h, v[self.w].transpose(1, 2), add=out)
            if self.b is not None:
                out = out.add_(v[self.b].unsqueeze(1))
        return out, r

    def rbackward(self, p, v, d, rd, h, r, rgrads, need_input):
        if rd is not None:
            rgrads[self.w] = _bmm_tn(rd, h)
            if self.b is not None:
                rgrads[self.b] = rd.sum(1)
        if r is not None:
            rgrads[self.w] = _bmm_tn(d, r, add=rgrads.get(self.w))
        if not need_input:
            return None
        out = None if rd is None else _matmul(rd, p[self.w], transpose=False)
        if v is not None:
            out = _bmm(d, v[self.w], add=out)
        return out


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """``a + b`` where None is zero."""
    if a is None:
        return b
    return a if b is None else a + b


class _Activation(_Layer):
    """Elementwise activations; the backward uses the ``aten`` kernels autograd uses, so
    the inner gradient is bit-for-bit autograd's and itself differentiable."""

    analytic = True

    def __init__(self, module: nn.Module) -> None:
        self.kind = type(module)
        self.module = module  # GELU's ``approximate`` is read at call time

    def forward(self, p, h, share):
        if self.kind is nn.ReLU:
            out = torch.relu(h)
            return out, out
        if self.kind is nn.Tanh:
            out = torch.tanh(h)
            return out, out
        if self.kind is nn.GELU:
            return F.gelu(h, approximate=self.module.approximate), h
        if self.kind is nn.SiLU:
            return F.silu(h), h
        return h, None  # nn.Identity

    def backward(self, p, d, saved, grads, need_input):
        if self.kind is nn.ReLU:
            return torch.ops.aten.threshold_backward(d, saved, 0)
        if self.kind is nn.Tanh:
            return torch.ops.aten.tanh_backward(d, saved)
        if self.kind is nn.GELU:
            return torch.ops.aten.gelu_backward(d, saved, approximate=self.module.approximate)
        if self.kind is nn.SiLU:
            return d * silu_derivative(saved)
        return d

    rop = True  # every activation here has its second derivative written out below

    def tangent(self, p, v, r, saved):
        if r is None or self.kind is nn.Identity:
            return r, r
        if self.kind is nn.ReLU:
            return torch.ops.aten.threshold_backward(r, saved, 0), None
        return self.backward(p, r, saved, None, True), r  # sigma'(z) r

    def rbackward(self, p, v, d, rd, saved, r, rgrads, need_input):
        """``sigma'(z) rd + sigma''(z) r d``."""
        if self.kind is nn.Identity:
            return rd
        if self.kind is nn.ReLU:  # piecewise linear: no curvature term
            return None if rd is None else torch.ops.aten.threshold_backward(rd, saved, 0)
        first = None if rd is None else self.backward(p, rd, saved, None, True)
        if r is None:
            return first
        return _add(first, self._second(saved) * (r * d))

    def _second(self, saved) -> torch.Tensor:
        return activation_second(self.kind, saved, getattr(self.module, "approximate", "none"))


def silu_derivative(z: torch.Tensor) -> torch.Tensor:
    """``d/dz z sigmoid(z) = s (1 + z (1 - s))`` (aten's silu_backward has no derivative)."""
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def activation_second(kind: type, saved: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``sigma''(z)`` of a Tanh, SiLU or GELU (``kind``: the module class), from the
    activation's output for tanh and its input ``z`` otherwise."""
    if kind is nn.Tanh:  # d/dz (1 - t^2) = -2 t (1 - t^2)
        return -2 * saved * (1 - saved * saved)
    z = saved
    if kind is nn.SiLU:  # s (1 - s) (2 + z (1 - 2 s))
        s = torch.sigmoid(z)
        return s * (1 - s) * (2 + z * (1 - 2 * s))
    if approximate == "tanh":
        # 0.5 z (1 + t), t = tanh(u), u = c (z + k z^3):
        # (1 - t^2) u' + 0.5 z (1 - t^2) (u'' - 2 t u'^2)
        c, k = math.sqrt(2 / math.pi), 0.044715
        t = torch.tanh(c * (z + k * z**3))
        du = c * (1 + 3 * k * z * z)
        ddu = c * 6 * k * z
        sech2 = 1 - t * t
        return sech2 * du + 0.5 * z * sech2 * (ddu - 2 * t * du * du)
    # exact GELU z Phi(z): phi(z) (2 - z^2)
    phi = torch.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi))
    return phi * (2 - z * z)


_ACTIVATIONS = (nn.ReLU, nn.Tanh, nn.GELU, nn.SiLU, nn.Identity)


class _Sine(_Layer):
    """``SineLayer``: ``sin(w0 * linear(x))``."""

    analytic = True

    def __init__(self, prefix: str, module: SineLayer) -> None:
        self.linear = _Linear(f"{prefix}linear.", module.linear)
        self.module = module  # w0 is read at call time
        self.params = self.linear.params

    def forward(self, p, h, share):
        z, saved = self.linear.forward(p, h, share)
        pre = self.module.w0 * z
        return torch.sin(pre), (saved, pre)

    def backward(self, p, d, saved, grads, need_input):
        linear_saved, pre = saved
        dz = d * (self.module.w0 * torch.cos(pre))
        return self.linear.backward(p, dz, linear_saved, grads, need_input)

    rop = True

    def tangent(self, p, v, r, saved):
        linear_saved, pre = saved
        rz, linear_r = self.linear.tangent(p, v, r, linear_saved)
        if rz is None:
            return None, (linear_r, None)
        return rz * (self.module.w0 * torch.cos(pre)), (linear_r, rz)

    def rbackward(self, p, v, d, rd, saved, rsaved, rgrads, need_input):
        (linear_saved, pre), (linear_r, rz) = saved, rsaved or (None, None)
        w0 = self.module.w0
        dz = d * (w0 * torch.cos(pre))
        rdz = None if rd is None else rd * (w0 * torch.cos(pre))
        if rz is not None:  # curvature: d/dz [w0 cos(w0 z)] = -w0^2 sin(w0 z)
            rdz = _add(rdz, d * rz * (-(w0**2) * torch.sin(pre)))
        return self.linear.rbackward(p, v, dz, rdz, linear_saved, linear_r, rgrads, need_input)


class _Embeddings(_Layer):
    """``DiscreteEncoder``: one table per integer coordinate, concatenated."""

    analytic = True

    def __init__(self, prefix: str, module: DiscreteEncoder) -> None:
        self.params = tuple(f"{prefix}tables.{i}.weight" for i in range(len(module.tables)))
        self.num = len(module.sizes)

    def _index(self, x):
        if x.dim() == 2 or x.shape[-1] != self.num:
            x = x.unsqueeze(-1)
        return x.long()

    def forward(self, p, x, share):
        x = self._index(x)
        outs = []
        rows = None
        for i, name in enumerate(self.params):
            table = p[name]
            if share and _shared(table):
                outs.append(F.embedding(x[..., i], table[0]))
            else:
                if rows is None:
                    rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
                outs.append(table[rows, x[..., i]])
        return torch.cat(outs, -1) if len(outs) > 1 else outs[0], x

    def backward(self, p, d, x, grads, need_input):
        width = d.shape[-1] // self.num
        for i, name in enumerate(self.params):
            table = p[name]
            di = d[..., i * width : (i + 1) * width]
            index = x[..., i].unsqueeze(-1).expand(-1, -1, width)
            grads[name] = d.new_zeros(table.shape).scatter_add(1, index, di)
        return None

    rop = True

    def tangent(self, p, v, r, x):
        if v is None:
            return None, None
        rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
        outs = [v[name][rows, x[..., i]] for i, name in enumerate(self.params)]
        return (torch.cat(outs, -1) if len(outs) > 1 else outs[0]), None

    def rbackward(self, p, v, d, rd, x, r, rgrads, need_input):
        if rd is not None:
            self.backward(p, rd, x, rgrads, need_input=False)
        return None


class _Identity(_Layer):
    analytic = True

    rop = True

    def forward(self, p, h, share):
        return h, None

    def backward(self, p, d, saved, grads, need_input):
        return d

    def tangent(self, p, v, r, saved):
        return r, None

    def rbackward(self, p, v, d, rd, saved, rsaved, rgrads, need_input):
        return rd


class _GatedLinear(_Layer):
    def __init__(self, prefix: str, module: GatedLinear) -> None:
        self.linear = _Linear(f"{prefix}linear.", module.linear)
        self.params = self.linear.params

    def forward(self, p, h, share):
        value, gate = self.linear.forward(p, h, share)[0].chunk(2, dim=-1)
        return torch.tanh(value) * torch.sigmoid(gate), None


class _LayerNorm(_Layer):
    """The bodies' composite :class:`LayerNorm` (same formula, batched affine)."""

    def __init__(self, prefix: str, module: LayerNorm) -> None:
        self.module = module  # eps is read at call time
        self.w = f"{prefix}weight" if module.weight is not None else None
        self.b = f"{prefix}bias" if module.bias is not None else None
        self.params = tuple(n for n in (self.w, self.b) if n is not None)

    def forward(self, p, h, share):
        centered = h - h.mean(-1, keepdim=True)
        out = centered * torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + self.module.eps)
        if self.w is not None:
            out = out * p[self.w].unsqueeze(1)
        if self.b is not None:
            out = out + p[self.b].unsqueeze(1)
        return out, None


class _LSTMBlock(_Layer):
    def __init__(self, prefix: str, module: LSTMBlock, norm: _Layer | None) -> None:
        self.inp = _Linear(f"{prefix}input_to_gates.", module.input_to_gates)
        self.state = f"{prefix}state_to_gates.weight"
        self.h0, self.c0 = f"{prefix}h0", f"{prefix}c0"
        self.norm = norm
        self.params = (
            *self.inp.params,
            self.state,
            self.h0,
            self.c0,
            *(norm.params if norm is not None else ()),
        )

    def forward(self, p, h, share):
        # the state term is one vector per task, broadcast over the task's elements
        state = torch.bmm(p[self.h0].unsqueeze(1), p[self.state].transpose(1, 2))
        gates = self.inp.forward(p, h, share)[0] + state
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * p[self.c0].unsqueeze(1) + torch.sigmoid(i) * torch.tanh(g)
        out = torch.sigmoid(o) * torch.tanh(c)
        return (self.norm.forward(p, out, share)[0] if self.norm is not None else out), None


# ------------------------------------------------------------------------------ compile
def _chain(prefix: str, module: nn.Module) -> list[_Layer] | None:
    """The batched layers of ``module`` (None if some part of it is not supported)."""
    kind = type(module)
    if kind is SequenceModel:
        layers = []
        for name in ("encoder", "body", "head"):
            part = _chain(f"{prefix}{name}.", getattr(module, name))
            if part is None:
                return None
            layers += part
        return layers
    if kind is nn.Sequential:
        layers = []
        for name, child in module.named_children():
            part = _chain(f"{prefix}{name}.", child)
            if part is None:
                return None
            layers += part
        return layers
    if kind in (MLP, GatedMLP, LSTMBlockStack, Siren):
        return _chain(f"{prefix}net.", module.net)
    if kind is nn.Linear:
        return [_Linear(prefix, module)]
    if kind in _ACTIVATIONS:
        return [_Activation(module)]
    if kind is ContinuousEncoder:
        return [_Identity()]
    if kind is DiscreteEncoder:
        return [_Embeddings(prefix, module)]
    if kind is SineLayer:
        return [_Sine(prefix, module)]
    if kind is GatedLinear:
        return [_GatedLinear(prefix, module)]
    if kind is LayerNorm and len(module.normalized_shape) == 1:
        return [_LayerNorm(prefix, module)]
    if kind is LSTMBlock:
        if type(module.norm) is nn.Identity:
            norm = None
        elif type(module.norm) is LayerNorm and len(module.norm.normalized_shape) == 1:
            norm = _LayerNorm(f"{prefix}norm.", module.norm)
        else:
            return None
        return [_LSTMBlock(prefix, module, norm)]
    return None


class BatchedModel:
    """A model compiled into batched layers.

    Attributes:
        layers: the layers in order.
        analytic: every layer has a hand-written backward (inner gradients without
            ``torch.autograd.grad`` through the network).
    """

    def __init__(self, layers: list[_Layer]) -> None:
        self.layers = layers
        self.analytic = all(layer.analytic for layer in layers)

    def forward(self, p: dict, x: torch.Tensor, keep: bool = False, share: bool = True):
        """``[B, n, ...]`` inputs -> ``[B, n, out]`` predictions (and, with ``keep``,
        what each layer's backward needs).

        ``share``: a parameter all tasks still share (a broadcast view) is used as one
        tensor (one ``linear`` over all tasks' inputs). Its autograd gradient is then
        the sum over tasks: pass False where per-task gradients are taken by autograd.
        """
        saved = []
        h = x
        for layer in self.layers:
            h, s = layer.forward(p, h, share)
            if keep:
                saved.append(s)
        return h, saved

    def backward(self, p: dict, d: torch.Tensor, saved: list, deltas: list | None = None) -> dict:
        """Gradients ``{name: [B, ...]}`` of the loss whose gradient w.r.t. the output
        is ``d`` (analytic models only). ``deltas``, if given, receives the gradient
        w.r.t. each layer's output, in layer order."""
        grads: dict = {}
        if deltas is not None:
            deltas[:] = [None] * len(self.layers)
        for i in reversed(range(len(self.layers))):
            if deltas is not None:
                deltas[i] = d
            d = self.layers[i].backward(p, d, saved[i], grads, need_input=i > 0)
        return grads


#: compiled models, rebuilt when the module tree or the parameter names change
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compile_model(model: nn.Module, names: list[str]) -> BatchedModel | None:
    """The batched form of ``model``, or None if it holds a module without one.

    Supported (exact types): ``SequenceModel`` of the continuous or discrete encoder, a
    body among ``MLP``, ``GatedMLP``, ``LSTMBlockStack`` (LayerNorm included),
    ``Siren``, and a ``Linear`` head; ``nn.Sequential`` of ``Linear``, ``ReLU``,
    ``Tanh``, ``GELU``, ``SiLU``, ``Identity``. Models with buffers are not. The result
    is cached per model (keyed on its module types and parameter names, so a swapped
    submodule is recompiled); layer attributes such as ``w0`` are read at call time.
    """
    key = (tuple(names), tuple(map(type, model.modules())))
    cached = _CACHE.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    batched = _compile(model, names)
    _CACHE[model] = (key, batched)
    return batched


def _compile(model: nn.Module, names: list[str]) -> BatchedModel | None:
    if any(True for _ in model.buffers()):
        return None
    layers = _chain("", model)
    if layers is None:
        return None
    covered = [n for layer in layers for n in layer.params]
    if sorted(covered) != sorted(names) or len(set(covered)) != len(covered):
        return None  # shared or unexpected parameters: let the generic path handle it
    return BatchedModel(layers)


# ------------------------------------------------------------------------------ runner
class BatchedRunner:
    """Runs a stretch of inner steps for all tasks at once on ``[B, ...]`` parameters
    (same interface as the generic ``vmap`` runner of :mod:`.functional`).

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
    ) -> None:
        self.model = model
        self.names = names
        self.loss_fn = loss_fn
        self.slots = RateSlots(rates)
        self.rate_tensors = self.slots.tensors
        self.chunk_size = chunk_size
        self.track_query = track_query
        self.path = path
        self.batched = batched
        self.buffers = dict(model.named_buffers()) if path == "vmap" else {}
        self.loss_grad = closed_form_loss(loss_fn) if path == "analytic" else None
        from reptile_gen.inner_loop import second_order  # it imports this module

        #: the hand-written reverse pass (:mod:`.second_order`) replaces the autograd graph
        self.hand = (
            second_order if hand_backward and second_order.supports(batched, self.loss_grad)
            else None
        )  # fmt: skip

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

    def rates(self, rate_tensors) -> dict:
        """``{name: rate}`` with the learned rates taken from ``rate_tensors``."""
        return self.slots.rates(rate_tensors)

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
        """Run ``steps`` (``(start, end, record, first_order)`` each) from batched
        ``params``; returns the new params, ``[B, n]`` step losses, ``[B, e]`` element
        losses of the recorded steps and ``[B, n]`` query losses (if tracked)."""
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
        rates = [self.rates(rate_tensors)[n] for n in self.names]
        sx, sy, sm = data
        grad_on = torch.is_grad_enabled()
        graph = grad_on and (_needs_grad(params) or _needs_grad(rate_tensors))
        if self.hand is not None and graph and not track_query and steps:
            return self.hand.HandSegment.apply(
                self, steps, data, len(params), *params, *rate_tensors
            )
        step_losses, element_losses, query_losses = [], [], []
        for start, end, record, first_order in steps:
            x, y = sx[:, start:end], sy[:, start:end]
            mask, weights = step_weights(sm, start, end, params[0].dtype)
            grads, elements = self._step_grads(
                params, x, y, weights, graph, second_order=graph and not first_order
            )
            step_losses.append((elements * weights).sum(1))
            if record:
                element_losses.append(elements * mask)
            if first_order:
                grads = [g.detach() for g in grads]
            params = [sgd_step(p, g, r, "fused") for p, g, r in zip(params, grads, rates)]
            if track_query:
                query_losses.append(self._query(params, query))
        num_tasks = sx.shape[0]
        zero = sx.new_zeros((num_tasks, 0), dtype=params[0].dtype)
        return (
            *params,
            torch.stack(step_losses, 1) if step_losses else zero,
            torch.cat(element_losses, 1) if element_losses else zero,
            torch.stack(query_losses, 1) if query_losses else zero,
        )


def _needs_grad(tensors) -> bool:
    return any(t.requires_grad for t in tensors)
