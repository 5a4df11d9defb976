"""A hand-written reverse pass through the inner loop of the ``analytic`` path.

Second-order MAML on the ``analytic`` path used to build an autograd graph of every inner
step (the hand-written inner gradient is made of ordinary ops) and let autograd walk it
back: one graph node per op, dozens per step. On small models (sine MAML: a 40x40 MLP)
that bookkeeping, not arithmetic, was most of a meta-step. Here a stretch of inner steps
is one ``autograd.Function`` (:class:`HandSegment`) whose backward is written out.

For one inner step ``theta' = theta - r * g(theta)`` with ``g`` the gradient of the
step's weighted loss ``L = sum_i w_i loss_i``, the adjoint is

    theta_bar = theta_bar' - H (r * theta_bar') + B(c * dloss/dpred)

where ``H`` is the Hessian of ``L``, ``B(s)`` the parameter gradient of a backward pass
seeded with ``s`` at the output, and ``c_i`` the adjoint of element ``i``'s loss (from the
step-loss and element-loss outputs). ``H v`` is Pearlmutter's R-operator: a forward pass
of tangents (each layer's :meth:`tangent`) and the tangent of the backward pass (each
layer's :meth:`rbackward`). The backward pass is linear in its output seed, so the
first-order term rides along as an extra seed: one R-pass per step gives both. First-order
steps (``fomaml``, truncation) skip the tangents. Learned inner rates get
``-sum theta_bar' * g``; a rate that changes along the loop (a schedule, per-step rates)
passes each step's term to the entry of the base rate it came from, times the step's
schedule factor (:meth:`~reptile_gen.inner_loop.core.StepRates.base_grad`).

Covered: models whose layers all have R-operators (``Linear``, ReLU, Tanh, Identity,
``SineLayer``, the encoders) and the three closed-form losses (squared error, cross
entropy, Bernoulli); anything else keeps the autograd graph. The query loss gets the same
treatment (:class:`HandQuery`, first order). The backward is not itself differentiable
(``create_graph=True`` through it is an error; ``hand_backward=False`` keeps the autograd
graph for that). Float64 parity tests guard both against the
generic ``vmap_grad`` path and the autograd graph of the same path.
"""

from __future__ import annotations

import torch

from reptile_gen.inner_loop.core import sgd_update_list, step_weights
from reptile_gen.inner_loop.core.recompute import add_grad

__all__ = ["HandSegment", "HandQuery", "supports"]


def supports(batched, loss_grad) -> bool:
    """Whether the hand-written reverse pass covers this compiled model and loss."""
    return (
        batched is not None
        and batched.analytic
        and all(layer.rop for layer in batched.layers)
        and loss_grad is not None
    )


# ------------------------------------------------------------------------------ passes
def _forward_backward(batched, loss_grad, p: dict, x, y, weights):
    """Forward and inner backward of one step, keeping what the R-pass needs."""
    pred, saved = batched.forward(p, x, keep=True)
    elements, g = loss_grad.loss_and_grad(pred, y)
    deltas: list = []
    grads = batched.backward(p, g * weights.unsqueeze(-1), saved, deltas=deltas)
    return pred, saved, deltas, elements, g, grads


def _rpass(batched, curvature, p, v, pred, y, weights, saved, deltas, seed) -> dict:
    """``H v + B(seed)`` per parameter name (missing names: zero). ``v`` None: ``B(seed)``."""
    layers = batched.layers
    r, rsaved = None, []
    if v is not None:
        for layer, s in zip(layers, saved):
            r, rs = layer.tangent(p, v, r, s)
            rsaved.append(rs)
    else:
        rsaved = [None] * len(layers)
    rd = seed
    if r is not None:  # r is R{pred}
        rd = curvature(pred, y, r, weights, seed)
    rgrads: dict = {}
    for i in reversed(range(len(layers))):
        rd = layers[i].rbackward(p, v, deltas[i], rd, saved[i], rsaved[i], rgrads, i > 0)
    return rgrads


def _refuse_create_graph() -> None:
    """The hand-written backward is not itself differentiable: a gradient of the
    meta-gradient (``create_graph=True``) would silently miss its terms."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "the functional engine's hand-written reverse pass (analytic path) is not "
            "differentiable: a backward with create_graph=True through it is not supported; "
            "build the engine with hand_backward=False for higher-order meta-gradients"
        )


def _reduce_to(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` ([B, ...]) summed down to the shape of a rate tensor ``like``."""
    return t.sum() if like.dim() == 0 else t.sum(0).sum_to_size(like.shape)


def _shared_rate(rates: list) -> float | None:
    """The one fixed learning rate all parameters use, if so (then an update is one
    ``_foreach`` call rather than an op per tensor)."""
    first = rates[0]
    if isinstance(first, float) and all(isinstance(r, float) and r == first for r in rates):
        return first
    return None


def _update(params: list, grads: list, rates: list, shared_rate: float | None) -> list:
    """``p - rate * g`` for every parameter (the inner SGD step)."""
    return sgd_update_list(params, grads, rates if shared_rate is None else shared_rate, "fused")


class HandSegment(torch.autograd.Function):
    """A stretch of inner steps of a :class:`BatchedRunner` (``analytic`` path) with a
    hand-written backward; same inputs and outputs as ``runner.segment`` (tracked query
    losses excluded: the caller keeps the autograd path for those)."""

    @staticmethod
    def forward(ctx, runner, steps, data, num_params, *tensors):
        params = list(tensors[:num_params])
        rate_tensors = list(tensors[num_params:])
        names, batched, loss_grad = runner.names, runner.batched, runner.loss_grad
        per_step = runner.slots.steps is not None

        def step_rates(index):
            """``(rates by parameter, the one fixed rate they share or None)`` of a step."""
            rates = runner.rates(rate_tensors, index if per_step else None)
            rate_list = [rates[n] for n in names]
            return rate_list, _shared_rate(rate_list)

        constant = None if per_step else step_rates(None)
        sx, sy, sm = data
        # the inner gradients are kept only for the learned rates' gradients
        keep_grads = any(t.requires_grad for t in rate_tensors)
        tape, step_losses, element_losses = [], [], []
        masks: dict = {}  # few-shot steps revisit the same slice: its weights once
        for start, end, record, first_order, index in steps:
            x, y = sx[:, start:end], sy[:, start:end]
            if (start, end) not in masks:
                masks[start, end] = step_weights(sm, start, end, params[0].dtype)
            mask, weights = masks[start, end]
            rate_list, shared_rate = constant or step_rates(index)
            p = dict(zip(names, params))
            pred, saved, deltas, elements, g, grads = _forward_backward(
                batched, loss_grad, p, x, y, weights
            )
            grads = [grads[n] for n in names]
            kept = grads if keep_grads else None
            tape.append(
                (p, y, weights, mask, record, first_order, pred, saved, deltas, g, kept)
                + (index, rate_list, shared_rate)
            )
            step_losses.append((elements * weights).sum(1))
            if record:
                element_losses.append(elements * mask)
            params = _update(params, grads, rate_list, shared_rate)
        ctx.runner, ctx.tape = runner, tape
        ctx.num_params, ctx.rate_tensors = num_params, rate_tensors
        num_tasks = sx.shape[0]
        zero = sx.new_zeros((num_tasks, 0), dtype=params[0].dtype)
        return (
            *params,
            torch.stack(step_losses, 1),
            torch.cat(element_losses, 1) if element_losses else zero,
            zero.clone(),
        )

    @staticmethod
    def backward(ctx, *grad_outputs):
        _refuse_create_graph()
        runner, tape = ctx.runner, ctx.tape
        names, batched = runner.names, runner.batched
        plan = runner.slots.steps  # per-step rates: each step's rate maps to its base
        curvature = runner.loss_grad.curvature
        n = ctx.num_params
        theta_bar = list(grad_outputs[:n])
        g_steps, g_elements = grad_outputs[n], grad_outputs[n + 1]
        slots = [runner.slots.slots[name] for name in names]
        wanted = [t.requires_grad for t in ctx.rate_tensors]
        rate_grads: list = [None] * len(ctx.rate_tensors)
        offset = g_elements.shape[1]
        scaled: dict = {}  # weights * factor, once per distinct weights tensor
        for k in reversed(range(len(tape))):
            p, y, weights, mask, record, first_order, pred, saved, deltas, g, grads = tape[k][:11]
            index, rate_list, shared_rate = tape[k][11:]
            # the R-pass is linear in (v, seed): with one fixed rate r, pass v = theta_bar
            # and seed / r and scale the result by r (no per-tensor product r * theta_bar);
            # the seed is minus the first-order term, B(-c g)
            scale = shared_rate if not first_order and shared_rate else None
            factor = -1.0 / scale if scale is not None else -1.0
            key = (id(weights), factor)
            if key not in scaled:
                scaled[key] = weights * factor
            c = g_steps[:, k : k + 1] * scaled[key]
            if record:
                width = mask.shape[1]
                c = torch.addcmul(c, g_elements[:, offset - width : offset], mask, value=factor)
                offset -= width
            for i, slot in enumerate(slots):
                if slot is not None and wanted[slot]:
                    like = ctx.rate_tensors[slot]
                    if plan is None:
                        term = -_reduce_to(theta_bar[i] * grads[i], like)
                    else:  # d/d(this step's rate), then to the base tensor it comes from
                        term = -_reduce_to(theta_bar[i] * grads[i], rate_list[i])
                        term = plan.base_grad(index, term, like)
                    rate_grads[slot] = add_grad(rate_grads[slot], term)
            if first_order:
                v = None
            elif scale is not None:
                v = dict(zip(names, theta_bar))
            else:
                v = {name: tb * r for name, tb, r in zip(names, theta_bar, rate_list)}
            seed = c.unsqueeze(-1) * g
            rg = _rpass(batched, curvature, p, v, pred, y, weights, saved, deltas, seed)
            if len(rg) == len(names):
                theta_bar = torch._foreach_add(
                    theta_bar, [rg[name] for name in names], alpha=-(scale or 1.0)
                )
            else:
                theta_bar = [
                    tb if name not in rg else tb.add(rg[name], alpha=-(scale or 1.0))
                    for name, tb in zip(names, theta_bar)
                ]
        ctx.tape = None
        return (None, None, None, None, *theta_bar, *rate_grads)


class HandQuery(torch.autograd.Function):
    """``[B]`` mean query loss at batched parameters, with a hand-written backward."""

    @staticmethod
    def forward(ctx, runner, qx, qy, *params):
        p = dict(zip(runner.names, params))
        pred, saved = runner.batched.forward(p, qx, keep=True)
        elements, g = runner.loss_grad.loss_and_grad(pred, qy)
        ctx.runner, ctx.p, ctx.saved, ctx.g = runner, p, saved, g
        return elements.mean(1)

    @staticmethod
    def backward(ctx, grad_losses):
        _refuse_create_graph()
        runner, g = ctx.runner, ctx.g
        d = g * (grad_losses / g.shape[1]).view(-1, 1, 1)
        grads = runner.batched.backward(ctx.p, d, ctx.saved)
        ctx.p = ctx.saved = ctx.g = None
        return (None, None, None, *(grads[n] for n in runner.names))
