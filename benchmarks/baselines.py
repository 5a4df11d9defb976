"""Hand-written reference implementations that the engines are compared against.

A baseline is a function ``(module, batch) -> (loss, logs)`` with the signature of
:meth:`MetaLearner.meta_loss`; the harness times it exactly like the module's own
``meta_loss`` (same module, same parameters, same outer optimizer).
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from reptile_gen.data.task_batch import TaskBatch

__all__ = ["plain_loop_maml_meta_loss"]


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
    if module.inner_lr.is_learned:
        raise ValueError("plain_loop baseline: learned inner learning rates are not supported")
    if module.objective != "query" or not batch.has_query:
        raise ValueError("plain_loop baseline: needs algorithm.objective=query and a query set")
    num_steps = module.train_schedule.num_steps
    if num_steps is None:
        raise ValueError("plain_loop baseline: needs algorithm.inner_steps (few-shot schedule)")
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
