"""The one model plan: a model as a chain of batched layers (:mod:`.layers`), or None
when it holds a module without a batched form."""

from __future__ import annotations

import weakref

import torch
from torch import nn

from reptile_gen.inner_loop.core.layers import (
    ACTIVATIONS,
    Activation,
    Embeddings,
    GatedLinearLayer,
    Identity,
    Layer,
    LayerNormLayer,
    Linear,
    LSTMBlockLayer,
    Sine,
)
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

__all__ = ["BatchedModel", "compile_model"]


def _chain(prefix: str, module: nn.Module) -> list[Layer] | None:
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
        return [Linear(prefix, module)]
    if kind in ACTIVATIONS:
        return [Activation(module)]
    if kind is ContinuousEncoder:
        return [Identity()]
    if kind is DiscreteEncoder:
        return [Embeddings(prefix, module)]
    if kind is SineLayer:
        return [Sine(prefix, module)]
    if kind is GatedLinear:
        return [GatedLinearLayer(prefix, module)]
    if kind is LayerNorm and len(module.normalized_shape) == 1:
        return [LayerNormLayer(prefix, module)]
    if kind is LSTMBlock:
        if type(module.norm) is nn.Identity:
            norm = None
        elif type(module.norm) is LayerNorm and len(module.norm.normalized_shape) == 1:
            norm = LayerNormLayer(f"{prefix}norm.", module.norm)
        else:
            return None
        return [LSTMBlockLayer(prefix, module, norm)]
    return None


class BatchedModel:
    """A model compiled into batched layers.

    Attributes:
        layers: the layers in order.
        analytic: every layer has a hand-written backward (inner gradients without
            ``torch.autograd.grad`` through the network).
    """

    def __init__(self, layers: list[Layer]) -> None:
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
