"""What the compiled few-shot meta-step (:mod:`.compiled`) covers: the plan of a model (its
``Linear`` layers' parameters and activations, read off the shared batched model plan), and
the clear error for a model, loss or option it does not cover."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from reptile_gen.inner_loop.core.layers import Activation, Linear
from reptile_gen.inner_loop.core.losses import closed_form_loss
from reptile_gen.inner_loop.core.model_plan import compile_model

__all__ = ["ACTIVATIONS", "Plan", "check_call", "plan"]

#: the activation modules the compiled program covers
ACTIVATIONS = (nn.ReLU, nn.Tanh, nn.GELU, nn.SiLU)


# ------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class Plan:
    """What the compiled program of one model runs: the names of its ``Linear`` layers'
    parameters in order (weight, bias per layer) and each hidden layer's activation."""

    names: tuple[str, ...]
    activations: tuple[type, ...]

    def parameters(self, model: nn.Module) -> list[torch.Tensor]:
        """weight, bias of each layer (read at call time: a replaced tensor is seen)."""
        return [model.get_parameter(name) for name in self.names]


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def plan(model: nn.Module) -> Plan:
    """The :class:`Plan` of ``model`` (read off its batched form,
    :func:`~reptile_gen.inner_loop.core.model_plan.compile_model`), or a ``ValueError``
    saying what is not covered. Cached per model and rebuilt when a submodule is
    replaced."""
    key = tuple(map(id, model.modules()))
    cached = _PLANS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    from reptile_gen.models import SequenceModel
    from reptile_gen.models.bodies import MLP
    from reptile_gen.models.encoders import ContinuousEncoder

    def refuse(what: str):
        return ValueError(
            f"engine.compile=true: {what}; the compiled meta-step covers a continuous "
            "input, an MLP body (relu, tanh, gelu or silu) and a Linear head (model=mlp on "
            "sine-like tasks); set engine.compile=false for this model"
        )

    if not isinstance(model, SequenceModel):
        raise refuse(f"the model is a {type(model).__name__}, not a SequenceModel")
    if not isinstance(model.encoder, ContinuousEncoder):
        raise refuse(f"the input encoder is a {type(model.encoder).__name__}")
    if not isinstance(model.body, MLP):
        raise refuse(f"the body is a {type(model.body).__name__}")
    if type(model.head) is not nn.Linear or model.head.bias is None:
        raise refuse(f"the head is a {type(model.head).__name__}")
    for module in model.body.net:
        if type(module) is not nn.Linear and type(module) not in ACTIVATIONS:
            raise refuse(f"the body holds a {type(module).__name__}")
    batched = compile_model(model, [n for n, _ in model.named_parameters()])
    if batched is None:
        raise refuse("the model holds parameters outside its Linear layers")
    names, activations, linears = [], [], 0
    for layer in batched.layers[1:]:  # after the continuous encoder (an identity)
        if isinstance(layer, Linear) and layer.b is not None:
            names += [layer.w, layer.b]
            linears += 1
        elif isinstance(layer, Activation) and len(activations) < linears:
            if layer.kind is nn.GELU and layer.module.approximate != "none":
                raise refuse("a tanh-approximated GELU")
            activations.append(layer.kind)
        else:
            raise refuse(
                f"the body holds a {'Linear without bias' if isinstance(layer, Linear) else layer.kind.__name__}"
            )
    if len(activations) != linears - 1:
        raise refuse("a hidden Linear layer without an activation after it")
    result = Plan(tuple(names), tuple(activations))
    _PLANS[model] = (key, result)
    return result


def check_call(loss_fn, checkpoint_segments) -> str:
    """The loss's name in the compiled program; a ``ValueError`` for a loss or an option
    it does not cover."""
    loss = closed_form_loss(loss_fn)
    if loss is None:
        raise ValueError(
            "engine.compile=true: the task's loss has no closed form here; covered: the "
            "squared error, cross entropy and Bernoulli losses of the built-in tasks"
        )
    if checkpoint_segments is not None:
        raise ValueError(
            f"engine.compile=true with algorithm.checkpoint_segments="
            f"{checkpoint_segments!r}: the compiled few-shot meta-step keeps its whole "
            "unroll; allowed: checkpoint_segments=null"
        )
    return loss.name
