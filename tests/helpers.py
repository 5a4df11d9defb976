"""Shared helpers of the float64 gradient tests: tiny models, task batches, objectives,
finite differences and a hand-written first-order reference."""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from reptile_gen.data.task_batch import TaskBatch
from reptile_gen.data.task_spec import TaskSpec
from reptile_gen.inner_loop import InnerLR, InnerSchedule, make_engine
from reptile_gen.inner_loop.core import first_visit, unit_shape
from reptile_gen.models import MLP, build_model

DTYPE = torch.float64

CONTINUOUS = TaskSpec("continuous", "real")
CLASSES = TaskSpec("discrete", "classes", input_sizes=(8,), output_dim=5)

QUERY_SCHEDULE = InnerSchedule(num_steps=3)
ONLINE_1 = InnerSchedule(num_steps=None, inner_batch_size=1)
ONLINE_2 = InnerSchedule(num_steps=None, inner_batch_size=2)

#: a padded batch of 3 tasks of 5 support elements: task 0 is full, tasks 1 and 2 end
#: after 3 and 4 elements
PADDED_LENGTHS = [5, 3, 4]

FUNCTIONAL = make_engine("functional")
HIGHER = make_engine("higher")


def make_model(spec: TaskSpec = CONTINUOUS, body=None, seed: int = 0) -> nn.Module:
    """A tiny float64 model (default: tanh MLP [6, 6], smooth for finite differences)."""
    body = body or functools.partial(MLP, hidden_sizes=[6, 6], activation="tanh")
    torch.manual_seed(seed)
    return build_model(spec, body, embedding_dim=4).double()


def make_batch(
    spec: TaskSpec = CONTINUOUS,
    num_tasks: int = 3,
    support: int = 5,
    query: int | None = 4,
    lengths: list[int] | None = None,
    seed: int = 1,
) -> TaskBatch:
    """Random tasks; ``lengths`` (one per task) pads the end of shorter tasks with junk
    elements whose mask is False."""
    g = torch.Generator().manual_seed(seed)

    def draw(n):
        if spec.input_kind == "continuous":
            x = torch.rand(num_tasks, n, spec.input_dim, generator=g, dtype=DTYPE) * 4 - 2
        else:
            x = torch.randint(0, spec.input_sizes[0], (num_tasks, n, 1), generator=g)
        if spec.output_kind == "real":
            y = torch.randn(num_tasks, n, spec.output_dim, generator=g, dtype=DTYPE)
        else:
            y = torch.randint(0, spec.output_dim, (num_tasks, n), generator=g)
        return x, y

    sx, sy = draw(support)
    mask = torch.ones(num_tasks, support, dtype=torch.bool)
    if lengths is not None:
        for b, n in enumerate(lengths):
            mask[b, n:] = False
    qx, qy = draw(query) if query else (None, None)
    return TaskBatch(sx, sy, mask, qx, qy)


def unpadded_task(batch: TaskBatch, b: int) -> TaskBatch:
    """Task ``b`` alone, with its padding elements removed."""
    n = int(batch.support_mask[b].sum())
    return TaskBatch(
        batch.support_x[b : b + 1, :n],
        batch.support_y[b : b + 1, :n],
        None,
        None if batch.query_x is None else batch.query_x[b : b + 1],
        None if batch.query_y is None else batch.query_y[b : b + 1],
    )


def make_lr(model: nn.Module, learned: str = "none", init: float = 0.1, seed: int = 2) -> InnerLR:
    """Inner rates; learned ones are jittered around ``init`` so every entry differs."""
    lr = InnerLR([(n, p.shape) for n, p in model.named_parameters()], init, learned).double()
    return jitter_rates(lr, seed, spread=0.5)


def jitter_rates(lr: InnerLR, seed: int = 3, spread: float = 0.6) -> InnerLR:
    """``lr`` with each learned rate multiplied by a factor in ``1 ± spread / 2`` (in place),
    so that every entry differs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lr.parameters():
            p.mul_(1 + spread * (torch.rand(p.shape, generator=g, dtype=p.dtype) - 0.5))
    return lr


def objective(result, kind: str) -> torch.Tensor:
    """``query``: mean over tasks of the final query loss; ``online``: the summed online
    losses ``element_losses.sum()``."""
    if kind == "query":
        return result.final_query_loss.mean()
    return result.element_losses.sum()


def run_objective(engine, model, batch, lr, schedule, kind, grad_mode, spec=CONTINUOUS):
    result = engine.run(model, batch, spec.elementwise_loss, lr, schedule, grad_mode)
    return objective(result, kind)


def wrt(model: nn.Module, lr: InnerLR) -> list[torch.Tensor]:
    """The tensors a meta-gradient is taken with respect to: model, then learned rates."""
    return list(model.parameters()) + list(lr.parameters())


def meta_grads(engine, model, batch, lr, schedule, kind, grad_mode, spec=CONTINUOUS):
    """``(objective, grads)`` with grads w.r.t. :func:`wrt` (zeros where unused)."""
    value = run_objective(engine, model, batch, lr, schedule, kind, grad_mode, spec)
    params = wrt(model, lr)
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return value.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


@torch.no_grad()
def _shift(params: list[torch.Tensor], direction: list[torch.Tensor], scale: float) -> None:
    for p, d in zip(params, direction):
        p.add_(d, alpha=scale)


def directional_fd(fn, params, direction, eps: float = 1e-6) -> float:
    """Central difference ``(f(p + eps d) - f(p - eps d)) / 2 eps``; ``params`` restored."""
    _shift(params, direction, eps)
    plus = float(fn())
    _shift(params, direction, -2 * eps)
    minus = float(fn())
    _shift(params, direction, eps)
    return (plus - minus) / (2 * eps)


def entrywise_fd(fn, params, eps: float = 1e-6) -> list[torch.Tensor]:
    """Central difference for every entry of every tensor in ``params``."""
    out = []
    for k, p in enumerate(params):
        g = torch.zeros_like(p)
        for i in range(p.numel()):
            direction = [torch.zeros_like(q) for q in params]
            direction[k].view(-1)[i] = 1.0
            g.view(-1)[i] = directional_fd(fn, params, direction, eps)
        out.append(g)
    return out


def first_order_reference(model, batch, lr_values, schedule, kind, spec=CONTINUOUS):
    """First-order MAML by hand: each task's SGD on a detached copy of the model with
    ``torch.autograd``; the meta-gradient is the objective's gradient at the parameters
    where it is evaluated (``d theta_t / d theta_0 = I``), and a rate's gradient is that
    gradient times ``-sum`` of the (constant) inner gradients applied before.

    Args:
        lr_values: ``{name: float or tensor}`` inner rate of each parameter.

    Returns:
        ``(grads of the params, {name: d objective / d lr_name as a tensor shaped like
        the parameter})`` (the caller sums per-parameter rate gradients as its mode needs).
    """
    names = [n for n, _ in model.named_parameters()]
    grads = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    lr_grads = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    slices = schedule.slices(batch.support_x.shape[1])
    records = first_visit(slices)
    loss_fn = spec.elementwise_loss

    def grad_at(net, loss):
        return dict(
            zip(names, torch.autograd.grad(loss, list(net.parameters()), retain_graph=True))
        )

    for b in range(batch.num_tasks):
        net = copy.deepcopy(model)
        applied = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
        for (start, end), record in zip(slices, records):
            m = batch.support_mask[b, start:end]
            x, y = batch.support_x[b, start:end][m], batch.support_y[b, start:end][m]
            if x.shape[0] == 0:
                continue
            elements = loss_fn(net(x), y)
            if kind == "online" and record:
                g_obj = grad_at(net, elements.sum())
                for n in names:
                    grads[n] += g_obj[n]
                    lr_grads[n] -= g_obj[n] * applied[n]
            g = grad_at(net, elements.mean())
            with torch.no_grad():
                for n, p in net.named_parameters():
                    p.sub_(lr_values[n] * g[n])
                    applied[n] += g[n]
        if kind == "query":
            loss = loss_fn(net(batch.query_x[b]), batch.query_y[b]).mean() / batch.num_tasks
            g_obj = grad_at(net, loss)
            for n in names:
                grads[n] += g_obj[n]
                lr_grads[n] -= g_obj[n] * applied[n]
    return [grads[n] for n in names], lr_grads


def reduce_lr_grads(lr: InnerLR, lr_grads: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per-parameter rate gradients summed to the shapes of ``lr.parameters()``."""
    if lr.learned == "none":
        return []
    if lr.learned == "scalar":
        return [sum(g.sum() for g in lr_grads.values())]
    # ``lr.parameters()`` follows the ParameterDict's (sorted) keys, not the model's order
    by_key = {n.replace(".", "__"): n for n in lr.names}
    order = [by_key[key.removeprefix("rates.")] for key, _ in lr.named_parameters()]
    if lr.learned == "per_tensor":
        return [lr_grads[n].sum() for n in order]
    if lr.learned == "per_unit":
        return [lr_grads[n].sum_to_size(unit_shape(lr_grads[n].shape)) for n in order]
    return [lr_grads[n] for n in order]


def assert_all_close(actual, expected, rtol=1e-10, atol=1e-12, what=""):
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(
            a, e, rtol=rtol, atol=atol, msg=lambda m, i=i: f"{what}[{i}]: {m}"
        )


def _functional(**options):
    from reptile_gen.inner_loop import FunctionalEngine

    return FunctionalEngine(**options)


#: every engine and functional path the parity suites check, by name: options -> engine
PARITY_ENGINES = {
    "functional": lambda **o: make_engine("functional", **o),
    "functional_autograd_graph": lambda **o: _functional(hand_backward=False, **o),
    "functional_vmap": lambda **o: _functional(path="vmap", **o),
    "higher": lambda **o: make_engine("higher", **o),
    "lowrank": lambda **o: make_engine("lowrank", **o),
}

#: each inner-loop mode of the parity suites -> (grad_mode, the engine options it needs)
PARITY_MODES = {
    "reptile": ("none", {}),
    "first_order": ("first_order", {}),
    "second_order": ("second_order", {}),
    "checkpointed": ("second_order", {"checkpoint_segments": 2}),
    "truncated": ("second_order", {"truncate_steps": 2}),
}


def reference_engine(options: dict):
    """The generic path every engine is checked against: the functional engine's plain
    ``vmap_grad`` path, with the same truncation (checkpointing changes no gradient)."""
    return _functional(path="vmap_grad", truncate_steps=options.get("truncate_steps"))


def assert_matches_reference(
    ours, options, model, batch, lr, schedule, objective, grad_mode, spec, *,
    what="", tol=None, fd_rtol=None, every_row=False,
):  # fmt: skip
    """``ours`` gives the generic path's result (:func:`reference_engine`), in float64.

    ``grad_mode="none"`` (Reptile): the same step, element and query losses, adapted
    weights and their mean, without a graph. Otherwise: the same objective and
    meta-gradient; every tensor (``every_row``: every row of every tensor, e.g. every
    unit's rate) gets one; with ``fd_rtol``, the meta-gradient along a random direction
    equals the finite difference of the reference's objective to ``fd_rtol``."""
    tol = tol or {"rtol": 1e-10, "atol": 1e-12}
    reference = reference_engine(options)
    if grad_mode == "none":
        kw = {"return_adapted": True, "track_query": batch.has_query}
        with torch.enable_grad():
            a = ours.run(model, batch, spec.elementwise_loss, lr, schedule, "none", **kw)
            b = reference.run(model, batch, spec.elementwise_loss, lr, schedule, "none", **kw)
        for field in ("step_losses", "element_losses", "query_losses"):
            x, y = getattr(a, field), getattr(b, field)
            assert (x is None) == (y is None), field
            if x is not None:
                torch.testing.assert_close(x, y, **tol, msg=field)
        assert_all_close(list(a.adapted.values()), list(b.adapted.values()), what="adapted", **tol)
        mean_a, mean_b = a.mean_adapted(), b.mean_adapted()
        assert_all_close(list(mean_a.values()), list(mean_b.values()), what="mean", **tol)
        assert not any(t.requires_grad for t in mean_a.values())
        return
    va, ga = meta_grads(ours, model, batch, lr, schedule, objective, grad_mode, spec)
    vb, gb = meta_grads(reference, model, batch, lr, schedule, objective, grad_mode, spec)
    torch.testing.assert_close(va, vb, **tol)
    assert_all_close(ga, gb, what=what, **tol)
    for p, g in zip(wrt(model, lr), ga):  # every tensor (and learned rate) learns
        if every_row:
            rows = g.reshape(g.shape[0], -1) if g.dim() else g.reshape(1, 1)
            assert bool((rows.abs().sum(1) > 0).all()), tuple(p.shape)
        else:
            assert g.abs().sum() > 0, tuple(p.shape)
    if fd_rtol is not None:
        params = wrt(model, lr)
        gen = torch.Generator().manual_seed(7)
        direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]

        def value():
            return run_objective(reference, model, batch, lr, schedule, objective, "none", spec)

        fd = directional_fd(value, params, direction)
        exact = float(sum((gi * d).sum() for gi, d in zip(ga, direction)))
        assert abs(exact - fd) <= fd_rtol * max(1.0, abs(fd)), (exact, fd)
