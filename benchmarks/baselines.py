"""Hand-written reference implementations that the engines are compared against.

A baseline is a function ``(module, batch) -> (loss, logs)`` with the signature of
:meth:`MetaLearner.meta_loss`; the harness times it exactly like the module's own
``meta_loss`` (same module, same parameters, same outer optimizer).
"""

from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap

from reptile_gen.data.task_batch import TaskBatch

__all__ = [
    "plain_loop_maml_meta_loss",
    "vmap_reference_maml_meta_loss",
    "functional_vmap_grad_meta_loss",
    "functional_graph_meta_loss",
]


def _check_few_shot_maml(module, batch: TaskBatch, name: str) -> None:
    """The scope of the hand-written MAML baselines (anything else is refused rather
    than silently computed differently)."""
    if module.inner_lr.is_learned:
        raise ValueError(f"{name} baseline: learned inner learning rates are not supported")
    if module.objective != "query" or not batch.has_query:
        raise ValueError(f"{name} baseline: needs algorithm.objective=query and a query set")
    if module.train_schedule.num_steps is None:
        raise ValueError(f"{name} baseline: needs algorithm.inner_steps (few-shot schedule)")
    if not bool(batch.support_mask.all()):
        raise ValueError(f"{name} baseline: padded support sets are not supported")


def plain_loop_maml_meta_loss(module, batch: TaskBatch):
    """MAML's meta-loss as a user would write it by hand: a Python loop over the tasks.

    For each task: ``inner_steps`` steps of SGD on the whole support set, each on a
    functional copy of the parameters (``torch.func.functional_call``) with
    ``torch.autograd.grad(create_graph=True)``, then the query loss of the adapted
    parameters. No ``vmap``, no ``higher``. The query losses are summed and divided by
    the number of tasks, which is the functional engine's objective (mean over tasks).

    Covers what the sine MAML workloads use: fixed inner learning rate, few-shot schedule
    (``inner_steps`` set), query objective, no padding in the support set; anything else
    is refused rather than silently computed differently.
    """
    _check_few_shot_maml(module, batch, "plain_loop")
    num_steps = module.train_schedule.num_steps
    create_graph = module.grad_mode == "second_order"
    lr = module.inner_lr.init
    model = module.model
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())

    total = 0.0
    for b in range(batch.num_tasks):
        p = params
        sx, sy = batch.support_x[b], batch.support_y[b]
        for _ in range(num_steps):
            loss = module.loss_fn(functional_call(model, (p, buffers), (sx,)), sy).mean()
            grads = torch.autograd.grad(loss, list(p.values()), create_graph=create_graph)
            p = {name: value - lr * g for (name, value), g in zip(p.items(), grads)}
        pred = functional_call(model, (p, buffers), (batch.query_x[b],))
        total = total + module.loss_fn(pred, batch.query_y[b]).mean()
    return total / batch.num_tasks, {}


def vmap_reference_maml_meta_loss(module, batch: TaskBatch):
    """MAML's meta-loss as the straightforward ``torch.func`` program: ``vmap`` over the
    tasks of a function that takes ``inner_steps`` SGD steps with ``torch.func.grad`` of
    a ``functional_call`` and returns the query loss; the mean over tasks.

    The shared initial parameters enter the ``vmap`` unbatched (``in_dims=None``). This
    is the baseline the functional engine's fast paths are measured against (issue 5:
    at least 3x on sine MAML). Same scope as :func:`plain_loop_maml_meta_loss`; the
    first-order variant (``algorithm=fomaml``) detaches the inner gradients.
    """
    _check_few_shot_maml(module, batch, "vmap_reference")
    num_steps = module.train_schedule.num_steps
    first_order = module.grad_mode == "first_order"
    lr = module.inner_lr.init
    model = module.model
    loss_fn = module.loss_fn
    buffers = dict(model.named_buffers())

    def task_loss(params, sx, sy, qx, qy):
        def support_loss(p):
            return loss_fn(functional_call(model, (p, buffers), (sx,)), sy).mean()

        p = params
        for _ in range(num_steps):
            g = grad(support_loss)(p)
            if first_order:
                g = {k: v.detach() for k, v in g.items()}
            p = {k: p[k] - lr * g[k] for k in p}
        return loss_fn(functional_call(model, (p, buffers), (qx,)), qy).mean()

    losses = vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(
        dict(model.named_parameters()), batch.support_x, batch.support_y, batch.query_x,
        batch.query_y,
    )  # fmt: skip
    return losses.mean(), {}


def functional_vmap_grad_meta_loss(module, batch: TaskBatch):
    """The module's own meta-loss with the functional engine forced onto its generic
    ``vmap_grad`` path (``torch.func.grad`` inside ``vmap``: the engine before the fast
    paths), so the fast paths' speed-up over it comes from the same run."""
    engine = module.engine
    saved = engine.path
    engine.path = "vmap_grad"
    try:
        return module.meta_loss(batch)
    finally:
        engine.path = saved


def functional_graph_meta_loss(module, batch: TaskBatch):
    """The module's own meta-loss with the functional engine's hand-written reverse pass
    through the inner loop turned off (``hand_backward=False``: autograd's graph of the
    same ops), so that pass's speed-up comes from the same run."""
    engine = module.engine
    saved = engine.hand_backward
    engine.hand_backward = False
    try:
        return module.meta_loss(batch)
    finally:
        engine.hand_backward = saved
