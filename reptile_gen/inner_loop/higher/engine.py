"""The design card's engine: ``higher.innerloop_ctx``, one task at a time.

Slower than :mod:`~reptile_gen.inner_loop.functional` (a Python loop over tasks, the whole
unroll kept in memory) but it runs any inner optimizer ``higher`` differentiates through:
SGD, Adam, RMSprop, Adagrad, Adadelta, Adamax, ASGD (not AdamW).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from reptile_gen.inner_loop.core import (
    InnerLoopEngine,
    InnerLoopResult,
    LossFn,
    check_truncate_steps,
    first_order_before,
    first_visit,
    masked_mean,
)

if TYPE_CHECKING:
    from reptile_gen.data.task_batch import TaskBatch
    from reptile_gen.inner_loop.core import InnerLR, InnerSchedule

__all__ = ["HigherEngine", "INNER_OPTIMIZERS"]

INNER_OPTIMIZERS = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
    "adadelta": torch.optim.Adadelta,
    "adamax": torch.optim.Adamax,
    "asgd": torch.optim.ASGD,
}


class HigherEngine(InnerLoopEngine):
    """Per-task ``higher.innerloop_ctx`` with ``copy_initial_weights=False`` (so the
    meta-gradient reaches the model's own parameters, which MAML needs).

    First-order MAML detaches the inner gradients through ``grad_callback``; learned inner
    learning rates enter as higher's differentiable ``override`` of each parameter group's
    ``lr`` (one group per parameter tensor); rates that change along the loop (a schedule,
    per-step learned rates) override it at every step (with another inner optimizer, the
    schedule is that optimizer's ``lr`` per step). A step whose elements are all padding is
    skipped, so stateful optimizers (Adam's moments, step counts) are not advanced by it.
    Inner momentum (``InnerLR.momentum``, ``algorithm.inner_momentum``) is higher's SGD
    ``momentum`` (no dampening, no Nesterov): the heavy-ball step of the core update.

    Args:
        inner_optimizer: name in :data:`INNER_OPTIMIZERS`.
        inner_optimizer_kwargs: extra keyword arguments for the optimizer (betas, momentum...).
    """

    name = "higher"

    def __init__(
        self,
        inner_optimizer: str = "sgd",
        inner_optimizer_kwargs: dict | None = None,
        truncate_steps: int | None = None,
    ):
        check_truncate_steps(truncate_steps)
        self.inner_optimizer = inner_optimizer
        self.inner_optimizer_kwargs = dict(inner_optimizer_kwargs or {})
        self.truncate_steps = truncate_steps

    @classmethod
    def from_options(cls, inner_optimizer, inner_optimizer_kwargs, options):
        cls.refuse_compile(cls.name, options)
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(
                f"engine.inner_optimizer.name={inner_optimizer!r}; allowed with "
                f"engine=higher: {', '.join(INNER_OPTIMIZERS)}"
            )
        skip = ("compile", "inner_lr_learned", "inner_lr_schedule")  # every rate is supported
        _check_momentum(options.get("inner_momentum", 0.0), inner_optimizer, inner_optimizer_kwargs)
        skip += ("inner_momentum",)
        options = {k: v for k, v in options.items() if k not in skip}
        truncate_steps = options.pop("truncate_steps", None)
        unsupported = sorted(k for k, v in options.items() if v not in (None, 1))
        if unsupported:
            key = (
                "engine.chunk_size"
                if unsupported[0] == "chunk_size"
                else (f"algorithm.{unsupported[0]}")
            )
            raise ValueError(
                f"engine=higher does not support {key}={options[unsupported[0]]!r} (a "
                "functional-engine option; use engine=functional, or leave it null)"
            )
        return cls(inner_optimizer, inner_optimizer_kwargs, truncate_steps=truncate_steps)

    def run(
        self,
        model: nn.Module,
        batch: TaskBatch,
        loss_fn: LossFn,
        lr: InnerLR,
        schedule: InnerSchedule,
        grad_mode: str,
        *,
        track_query: bool = False,
        return_adapted: bool = False,
    ) -> InnerLoopResult:
        import higher  # imported here: the default engine must not depend on it

        names = [n for n, _ in model.named_parameters()]
        rates = lr.rates_by_name()
        if grad_mode == "none":
            rates = {n: r.detach() if torch.is_tensor(r) else r for n, r in rates.items()}
        slices = schedule.slices(batch.support_x.shape[1])
        plan = lr.step_rates(len(slices))
        override, step_lrs = None, None
        if not plan.constant:  # each step overrides every group's lr with its own rate
            step_lrs = [{"lr": [plan.at(rates, i)[n] for n in names]} for i in range(len(slices))]
        elif lr.is_learned:
            override = {"lr": [rates[n] for n in names]}
        kwargs = dict(self.inner_optimizer_kwargs)
        if lr.momentum:
            _check_momentum(lr.momentum, self.inner_optimizer, kwargs)
            kwargs["momentum"] = lr.momentum
        optimizer = INNER_OPTIMIZERS[self.inner_optimizer](
            [{"params": [p]} for p in model.parameters()], lr=lr.init, **kwargs
        )
        records = first_visit(slices)
        # steps before n_first_order have their inner gradients treated as constants
        n_first_order = first_order_before(len(slices), grad_mode, self.truncate_steps)
        has_query = batch.has_query
        # with no meta-gradient (Reptile, evaluation) nothing needs a task's graph once
        # its loop is done: detaching frees it instead of holding every task's unroll
        keep = (lambda t: t.detach()) if grad_mode == "none" else (lambda t: t)

        per_task = []
        for b in range(batch.num_tasks):
            sx, sy, sm = batch.support_x[b], batch.support_y[b], batch.support_mask[b]
            with higher.innerloop_ctx(
                model,
                optimizer,
                copy_initial_weights=False,
                track_higher_grads=grad_mode != "none",
                override=override,
            ) as (fmodel, diffopt):

                def query_loss(b=b):
                    return loss_fn(fmodel(batch.query_x[b]), batch.query_y[b]).mean()

                step_losses, element_losses, query_losses = [], [], []
                if has_query and track_query:
                    query_losses.append(keep(query_loss()))
                for i, ((start, end), record) in enumerate(zip(slices, records)):
                    x, y, m = sx[start:end], sy[start:end], sm[start:end]
                    elements = loss_fn(fmodel(x), y)
                    loss = masked_mean(elements, m)
                    step_losses.append(keep(loss))
                    if record:
                        element_losses.append(keep(elements * m.to(elements.dtype)))
                    if bool(m.any()):
                        diffopt.step(
                            loss,
                            override=None if step_lrs is None else step_lrs[i],
                            grad_callback=_detach_all if i < n_first_order else None,
                        )
                    if has_query and track_query:
                        query_losses.append(keep(query_loss()))
                if has_query and not track_query:
                    query_losses.append(keep(query_loss()))
                adapted = [keep(p) for p in fmodel.parameters()] if return_adapted else None
            per_task.append((step_losses, element_losses, query_losses, adapted))

        support_len = batch.support_x.shape[1]
        element_losses = torch.stack([torch.cat(t[1]) for t in per_task])
        if element_losses.shape[1] < support_len:
            element_losses = nn.functional.pad(
                element_losses, (0, support_len - element_losses.shape[1])
            )
        return InnerLoopResult(
            step_losses=torch.stack([torch.stack(t[0]) for t in per_task]),
            element_losses=element_losses,
            query_losses=(
                torch.stack([torch.stack(t[2]) for t in per_task]) if has_query else None
            ),
            adapted=(
                {n: torch.stack([t[3][i] for t in per_task]) for i, n in enumerate(names)}
                if return_adapted
                else None
            ),
        )


def _check_momentum(momentum, inner_optimizer: str, kwargs: dict) -> None:
    """``algorithm.inner_momentum`` is SGD's momentum: a clear error with another inner
    optimizer, or with momentum options of its own."""
    if not momentum:
        return
    own = sorted(k for k in ("momentum", "dampening", "nesterov") if kwargs.get(k))
    if inner_optimizer != "sgd" or own:
        given = f"name: {inner_optimizer}" + "".join(f", {k}: {kwargs[k]}" for k in own)
        raise ValueError(
            f"algorithm.inner_momentum={momentum} with engine.inner_optimizer={{{given}}}: "
            "inner momentum is the heavy-ball step of inner SGD; allowed: "
            "engine.inner_optimizer.name=sgd without momentum options of its own, or "
            "algorithm.inner_momentum=0"
        )


def _detach_all(grads):
    return [None if g is None else g.detach() for g in grads]
