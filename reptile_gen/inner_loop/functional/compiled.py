"""``engine.compile=true``: the few-shot MAML meta-step of an MLP as a compiled program.

On small models (sine MAML: 1-40-40-1) the functional engine's hand-written passes
(:mod:`.runner`, :mod:`.second_order`) are bound by eager per-op overhead: a few hundred
small ops per meta-step, each dispatched on its own. ``torch.compile`` cannot help the
autograd form (it has no double backward), but with the reverse pass written out the whole
meta-gradient is a *forward* program: ordinary tensor ops, no autograd inside. Here it is
written over flat tensors (no layer objects, so Dynamo traces it without graph breaks) and
compiled once per configuration and shape: Inductor fuses the elementwise work (the
activations, their derivatives, the losses, the SGD updates, the masks) into a few
generated C++ loops around the matmuls.

The pieces, traced into the programs:

* **forward**: the inner SGD steps on the support set from the shared initial parameters
  (the first step's layers are one ``mm`` over all tasks), then the query loss: the step
  losses, the first step's element losses and the query losses, plus what the reverse
  pass needs.
* **reverse**: the query loss's gradient at the adapted parameters, then back through each
  inner step ``theta' = theta - r g(theta)``: ``theta_bar = theta_bar' - H (r theta_bar') +
  B(c dloss/dpred)`` with the Hessian-vector product by Pearlmutter's R-operator (each
  activation's second derivative written out) and ``B`` the backward pass seeded with the
  step- and element-loss adjoints ``c``; first-order steps (``fomaml``, truncation) keep
  only ``B``; learned rates get ``-sum(theta_bar' g)``.

One program (``fused``) runs both with a unit adjoint on each task's query loss, since
that is MAML's objective and the meta-gradient is linear in those adjoints: it returns
the losses, their task-mean, each task's meta-gradient and their mean. The
``autograd.Function`` around it (:class:`_CompiledMAML`) then has nothing left to run in
backward but a scaling (``mv`` for other query adjoints). Only when the step or element
losses are part of the objective does a second program (``full``, compiled at its first
use) rerun the loop with those adjoints.

Covered (:func:`.compiled_plan.plan` says what is not): a ``SequenceModel`` with a
continuous encoder, an ``MLP`` body (ReLU, Tanh, exact GELU or SiLU) and a ``Linear`` head;
the squared-error, cross-entropy or Bernoulli loss; fixed or learned inner learning rates
(Meta-SGD: scalar, per tensor, per unit, per parameter; their gradient
``-sum(theta_bar' * g)`` per step, summed to the rate's shape); plain SGD steps (no inner
momentum); the few-shot schedule
(every step on the whole support set, masks allowed); no checkpointing. Meta-training
steps of ``maml``/``fomaml`` run here; evaluation (no meta-gradient) and anything else of
the engine run its eager path, with the same numbers (float64 parity tests). Width-1 layers
(the sine model's input and output) are broadcast products, not matmuls.

The first call for a new configuration or shape compiles (seconds: Inductor writes and
builds C++ with the system compiler); ``make bench`` reports that time separately.
"""

from __future__ import annotations

import torch

from reptile_gen.inner_loop.core import RateSlots, sgd_update_list
from reptile_gen.inner_loop.core.losses import loss_named
from reptile_gen.inner_loop.core.recompute import add_grad
from reptile_gen.inner_loop.functional import compiled_ops as ops

__all__ = ["built_programs", "clear_programs", "run_compiled"]

#: compiled programs per configuration (Dynamo recompiles per shape and dtype on its own)
_PROGRAMS: dict = {}


# ------------------------------------------------------------------------------ programs
def _make_programs(acts, loss, fixed, first_order, compile_):
    """The programs of one configuration (compiled unless ``compile_`` is False: the same
    code eagerly). ``fixed`` holds each parameter's inner rate: a float, or None for a
    learned rate (a tensor input of the programs, Meta-SGD)."""
    loss_grad, curvature = loss_named(loss).loss_and_grad, loss_named(loss).curvature
    num_steps = len(first_order)
    num = 2 * (len(acts) + 1)
    learned = [i for i, f in enumerate(fixed) if f is None]

    def aligned(rates):
        """Each parameter's rate: its float, or its learned tensor from ``rates``."""
        out = list(fixed)
        for i, r in zip(learned, rates):
            out[i] = r
        return out

    def forward(theta, rates, sx, sy, support_mask, qx, qy):
        params = list(theta)
        r = aligned(rates)
        mask = support_mask.to(params[0].dtype)
        weights = mask / mask.sum(1, keepdim=True).clamp(min=1)  # each step: a masked mean
        step_losses, saved = [], []
        element_losses = None
        for k in range(num_steps):
            pred, inputs, pre = ops.forward(params, sx, acts)
            elements, g = loss_grad(pred, sy)
            step_losses.append((elements * weights).sum(1))
            if k == 0:
                element_losses = elements * mask
            grads, deltas, back = ops.backward(params, acts, g * weights.unsqueeze(-1), inputs, pre)
            saved += [*params, *inputs, *pre, *deltas, *back[1:], pred, g]
            saved += [grads[i] for i in learned]  # the learned rates' gradients need them
            params = sgd_update_list(params, grads, r)
        pred, inputs, pre = ops.forward(params, qx, acts)
        elements, g = loss_grad(pred, qy)
        saved += [*params, *inputs, *pre, g, weights, mask]
        return elements.mean(1, keepdim=True), torch.stack(step_losses, 1), element_losses, saved

    n_layers = len(acts) + 1

    def unpack_step(saved, at):
        params = saved[at : at + num]
        at += num
        inputs = saved[at : at + n_layers]
        at += n_layers
        pre = saved[at : at + n_layers - 1]
        at += n_layers - 1
        deltas = saved[at : at + n_layers]
        at += n_layers
        back = [None, *saved[at : at + n_layers - 1]]
        at += n_layers - 1
        pred, g = saved[at], saved[at + 1]
        at += 2
        grads = saved[at : at + len(learned)]
        return (params, inputs, pre, deltas, back, pred, g, grads), at + len(learned)

    def reverse(saved, sy, rates, g_query, g_steps=None, g_elements=None):
        """Per-task gradients w.r.t. the initial parameters and the learned rates (one
        per parameter with a learned rate, reduced to its shape) for the adjoints of the
        query losses, step losses and element losses (None: zero)."""
        r = aligned(rates)
        steps = []
        at = 0
        for _ in range(num_steps):
            step, at = unpack_step(saved, at)
            steps.append(step)
        params = saved[at : at + num]
        at += num
        inputs = saved[at : at + n_layers]
        at += n_layers
        pre = saved[at : at + n_layers - 1]
        g, weights, mask = saved[at + n_layers - 1 :]
        d = g * (g_query / g.shape[1]).view(-1, 1, 1)
        theta_bar, _, _ = ops.backward(params, acts, d, inputs, pre)
        rate_bar: list = [None] * len(learned)
        for k in reversed(range(num_steps)):
            params, inputs, pre, deltas, back, pred, g, grads = steps[k]
            # theta' = theta - r * grad: the rate's adjoint is -sum(theta_bar' * grad)
            for j, (i, gp) in enumerate(zip(learned, grads)):
                term = -(theta_bar[i] * gp)
                if r[i].dim() == 0:
                    term = term.reshape(term.shape[0], -1).sum(1)
                elif r[i].shape != gp.shape[1:]:  # per-unit rates: summed over the inputs
                    term = term.sum_to_size(term.shape[0], *r[i].shape)
                rate_bar[j] = add_grad(rate_bar[j], term)
            seed = None
            if g_steps is not None:
                c = g_steps[:, k : k + 1] * weights
                if k == 0:
                    c = c + g_elements * mask
                seed = c.unsqueeze(-1) * g
            if first_order[k]:
                if seed is None:
                    continue
                extra, _, _ = ops.backward(params, acts, seed, inputs, pre)
            else:
                # -r H theta_bar + B(seed): the R-pass is linear in (v, seed)
                v = [-(rate * t) for rate, t in zip(r, theta_bar)]
                zero = torch.zeros_like(pred) if seed is None else seed

                def rd_of(rp, pred=pred, seed=zero):
                    return curvature(pred, sy, rp, weights, seed)

                extra = ops.rpass(params, acts, v, inputs, pre, deltas, back, rd_of)
            theta_bar = [t + e for t, e in zip(theta_bar, extra)]
        return theta_bar + rate_bar

    def fused(theta, rates, sx, sy, support_mask, qx, qy):
        """The losses, their task-mean (MAML's objective), each task's meta-gradient of
        its query loss (``[B, P]``: parameters, then learned rates) and their mean (the
        objective's meta-gradient, one tensor per input): when only the query losses
        carry adjoints, the meta-gradient is linear in them and nothing is left for the
        backward to run."""
        query, steps, elements, saved = forward(theta, rates, sx, sy, support_mask, qx, qy)
        per_task = reverse(saved, sy, rates, torch.ones_like(query))
        flat = torch.cat([t.reshape(t.shape[0], -1) for t in per_task], 1)
        mean_grads = [t.mean(0) for t in per_task]
        return query.mean(), query, steps, elements, flat, mean_grads

    def full(theta, rates, sx, sy, support_mask, qx, qy, g_query, g_steps, g_elements):
        """The meta-gradient for any adjoints of the three losses (recomputes the loop)."""
        _, _, _, saved = forward(theta, rates, sx, sy, support_mask, qx, qy)
        grads = reverse(saved, sy, rates, g_query, g_steps, g_elements)
        return [t.sum(0) for t in grads]

    if not compile_:
        return fused, full
    # fullgraph: a graph break would silently fall back to per-op eager execution
    options = {"cpp_wrapper": True}  # the kernels are called from C++, not from Python
    return (
        _Compiled(fused, options),
        _Compiled(full, options),  # compiled only if ever called
    )


class _Compiled:
    """``torch.compile`` of a program, done at its first call; a failure to compile (no
    C++ compiler, say) is a clear error rather than a stack of Inductor internals."""

    def __init__(self, function, options) -> None:
        self.function, self.options, self.program, self.ok = function, options, None, False

    def __call__(self, *args):
        if self.program is None:
            self.program = torch.compile(
                self.function, fullgraph=True, dynamic=False, options=self.options
            )
        if self.ok:
            return self.program(*args)
        try:
            out = self.program(*args)
        except Exception as error:  # noqa: BLE001 - re-raised with what to do
            raise RuntimeError(
                "engine.compile=true: torch.compile of the meta-step failed (on CPU, "
                "Inductor builds C++ with the system compiler: it needs g++ and the Python "
                "headers; on GPU, Triton); set engine.compile=eager (same program, op by "
                "op) or false. Cause: "
                f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
            ) from error
        self.ok = True
        return out


def built_programs() -> dict:
    """The programs built so far, per configuration key (a copy)."""
    return dict(_PROGRAMS)


def clear_programs() -> None:
    """Forget the built programs (the next call of a configuration compiles again)."""
    _PROGRAMS.clear()


def _programs(key):
    programs = _PROGRAMS.get(key)
    if programs is None:
        # one code object serves every configuration: allow a recompile per shape and
        # configuration beyond Dynamo's default of 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        programs = _make_programs(*key)
        _PROGRAMS[key] = programs
    return programs


class _CompiledMAML(torch.autograd.Function):
    """The compiled few-shot inner loop as one autograd node. Inputs: the parameters,
    then the distinct learned rate tensors; ``slots[j]`` is the rate tensor of the
    ``j``-th parameter with a learned rate (one shared scalar feeds them all)."""

    @staticmethod
    def forward(ctx, programs, data, slots, num_params, *tensors):
        theta, rate_tensors = tensors[:num_params], tensors[num_params:]
        rates = [rate_tensors[s] for s in slots]
        objective, query, steps, elements, per_task, mean_grads = programs[0](theta, rates, *data)
        ctx.set_materialize_grads(False)
        ctx.programs, ctx.data, ctx.slots = programs, data, slots
        ctx.theta, ctx.rates, ctx.rate_tensors = theta, rates, rate_tensors
        ctx.per_task, ctx.mean_grads = per_task, mean_grads
        ctx.num_steps = steps.shape[1]
        return objective, query, steps, elements

    @staticmethod
    def backward(ctx, g_objective, g_query, g_steps, g_elements):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "engine.compile=true: the compiled meta-gradient is not differentiable "
                "(a backward with create_graph=True through it is not supported); set "
                "engine.compile=false for higher-order gradients"
            )
        theta, rates, per_task = ctx.theta, ctx.rates, ctx.per_task
        inputs = [*theta, *rates]  # what the programs' gradients are for, in order
        head = (None, None, None, None)
        if g_query is None and g_steps is None and g_elements is None:
            # MAML's objective alone: its meta-gradient is already there
            if g_objective is None:
                return (*head, *[None] * (len(theta) + len(ctx.rate_tensors)))
            grads = torch._foreach_mul(ctx.mean_grads, g_objective)
        else:
            num_tasks = per_task.shape[0]
            if g_objective is not None:  # the objective is the query losses' mean
                g_mean = g_objective.expand(num_tasks, 1) / num_tasks
                g_query = g_mean if g_query is None else g_query + g_mean
            if g_steps is None and g_elements is None:
                # the meta-gradient is linear in the query losses' adjoints
                flat = torch.mv(per_task.t(), g_query.view(-1).to(per_task.dtype))
                sizes = [p.numel() for p in inputs]
                grads = [
                    t if p.dim() == 1 else t.view(p.shape)
                    for t, p in zip(flat.split(sizes), inputs)
                ]
            else:  # the step or element losses are in the objective: the general reverse
                support = ctx.data[2].shape[1]
                num_steps = ctx.num_steps
                zeros = per_task.new_zeros
                grads = ctx.programs[1](
                    [p.detach() for p in theta],
                    [r.detach() for r in rates],
                    *ctx.data,
                    zeros(num_tasks) if g_query is None else g_query.view(-1),
                    zeros(num_tasks, num_steps) if g_steps is None else g_steps,
                    zeros(num_tasks, support) if g_elements is None else g_elements,
                )
        ctx.per_task = ctx.mean_grads = ctx.theta = ctx.rates = None
        rate_grads: list = [None] * len(ctx.rate_tensors)
        for slot, grad in zip(ctx.slots, grads[len(theta) :]):
            rate_grads[slot] = add_grad(rate_grads[slot], grad.view(ctx.rate_tensors[slot].shape))
        return (*head, *grads[: len(theta)], *rate_grads)


def run_compiled(model, plan_, loss, rates, batch, first_order, compile_=True):
    """``(mean query loss [], query losses [B, 1], step losses [B, n], first-step element
    losses [B, K])`` of a few-shot inner loop with ``len(first_order)`` steps (True: a
    first-order step), differentiable w.r.t. the model's parameters and learned inner
    rates through the compiled reverse pass. ``rates``: ``{name: float or tensor}``."""
    split = RateSlots({name: rates[name] for name in plan_.names})
    fixed = tuple(
        None if split.slots[name] is not None else float(split.fixed[name]) for name in plan_.names
    )
    slots = [split.slots[name] for name in plan_.names if split.slots[name] is not None]
    key = (plan_.activations, loss, fixed, tuple(first_order), bool(compile_))
    data = (batch.support_x, batch.support_y, batch.support_mask, batch.query_x, batch.query_y)
    theta = plan_.parameters(model)
    return _CompiledMAML.apply(
        _programs(key), data, tuple(slots), len(theta), *theta, *split.tensors
    )
