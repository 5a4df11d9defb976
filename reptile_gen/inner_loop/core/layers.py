"""The batched layers: every task's parameters as one ``[B, ...]`` tensor.

Each layer runs its forward for all tasks at once (``Linear`` -> ``baddbmm``; a weight
still shared by all tasks, as at the first inner step, -> one ``linear`` over all tasks'
inputs). The *analytic* layers also have a hand-written backward (``bmm`` for weight
gradients, the ``aten`` backward kernels autograd itself uses for the activations) and
the R-operators of the hand-written second-order pass (``tangent``, ``rbackward``).
:mod:`.model_plan` assembles them into a model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reptile_gen.inner_loop.core.activations import activation_second, silu_derivative
from reptile_gen.inner_loop.core.recompute import add_grad
from reptile_gen.models.bodies import GatedLinear, LayerNorm, LSTMBlock, SineLayer
from reptile_gen.models.encoders import DiscreteEncoder

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "Embeddings",
    "GatedLinearLayer",
    "Identity",
    "Layer",
    "LayerNormLayer",
    "Linear",
    "LSTMBlockLayer",
    "Sine",
]


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
class Layer:
    """One batched layer. ``forward`` returns the output and what ``backward`` needs;
    ``backward`` (analytic layers only) writes the parameter gradients into ``grads``
    and returns the gradient w.r.t. the input (None if ``need_input`` is False)."""

    analytic = False
    #: has the R-operators (``tangent``, ``rbackward``) of the hand-written second-order
    #: reverse pass (:mod:`reptile_gen.inner_loop.functional.second_order`)
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


class Linear(Layer):
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


class Activation(Layer):
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
        return add_grad(first, self._second(saved) * (r * d))

    def _second(self, saved) -> torch.Tensor:
        return activation_second(self.kind, saved, getattr(self.module, "approximate", "none"))


ACTIVATIONS = (nn.ReLU, nn.Tanh, nn.GELU, nn.SiLU, nn.Identity)


class Sine(Layer):
    """``SineLayer``: ``sin(w0 * linear(x))``."""

    analytic = True

    def __init__(self, prefix: str, module: SineLayer) -> None:
        self.linear = Linear(f"{prefix}linear.", module.linear)
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
            rdz = add_grad(rdz, d * rz * (-(w0**2) * torch.sin(pre)))
        return self.linear.rbackward(p, v, dz, rdz, linear_saved, linear_r, rgrads, need_input)


class Embeddings(Layer):
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


class Identity(Layer):
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


class GatedLinearLayer(Layer):
    def __init__(self, prefix: str, module: GatedLinear) -> None:
        self.linear = Linear(f"{prefix}linear.", module.linear)
        self.params = self.linear.params

    def forward(self, p, h, share):
        value, gate = self.linear.forward(p, h, share)[0].chunk(2, dim=-1)
        return torch.tanh(value) * torch.sigmoid(gate), None


class LayerNormLayer(Layer):
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


class LSTMBlockLayer(Layer):
    def __init__(self, prefix: str, module: LSTMBlock, norm: Layer | None) -> None:
        self.inp = Linear(f"{prefix}input_to_gates.", module.input_to_gates)
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
