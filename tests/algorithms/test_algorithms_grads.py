"""Float64 gradient correctness of the meta-algorithms (the LightningModules' meta_loss).

* Reptile: one inner step is SGD on the pooled tasks; more steps give ``theta - mean phi``
  with ``phi`` from a hand-written SGD loop; an outer SGD step is exactly the paper's
  ``theta + epsilon (mean phi - theta)``;
* MAML: one inner step against the closed form ``(I - alpha H) g``, the modules against
  finite differences, against each other across engines, and first-order MAML against a
  hand-written reference;
* gradient properties as learn2learn checks them: non-zero meta-gradients, first order
  differs from second order, adaptation lowers the support loss.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    CONTINUOUS,
    PADDED_LENGTHS,
    assert_all_close,
    directional_fd,
    first_order_reference,
    flat,
    make_batch,
    make_model,
    reduce_lr_grads,
)

from reptile_gen.algorithms import FOMAML, MAML, Reptile
from reptile_gen.data.task_batch import TaskBatch
from reptile_gen.inner_loop import InnerSchedule

ENGINES = ["functional", "higher"]
LR = 0.1


def _module(cls, model, **kwargs):
    return cls(model, CONTINUOUS, **kwargs).double()


def _grads(module, batch):
    loss, _ = module.meta_loss(batch)
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _support_loss(model, batch: TaskBatch, b: int, start=0, end=None) -> torch.Tensor:
    """Task ``b``'s support loss: the mean over its real elements in ``[start, end)``."""
    m = batch.support_mask[b, start:end]
    x, y = batch.support_x[b, start:end][m], batch.support_y[b, start:end][m]
    return CONTINUOUS.elementwise_loss(model(x), y).mean()


def _plain_sgd(model, batch, b, schedule: InnerSchedule, lr=LR):
    """Task ``b``'s inner SGD on a copy of ``model`` with plain ``torch.autograd``."""
    net = copy.deepcopy(model)
    for start, end in schedule.slices(batch.support_x.shape[1]):
        if not batch.support_mask[b, start:end].any():
            continue
        grads = torch.autograd.grad(_support_loss(net, batch, b, start, end), net.parameters())
        with torch.no_grad():
            for p, g in zip(net.parameters(), grads):
                p.sub_(lr * g)
    return [p.detach() for p in net.parameters()]


# ------------------------------------------------------------------------------ Reptile
ONE_STEP = {
    "steps1": {"inner_steps": 1},
    "online_one_batch": {"inner_steps": None, "inner_batch_size": 5},
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("config", list(ONE_STEP))
def test_reptile_one_step_is_sgd_on_pooled_tasks(config, engine):
    """``theta - mean_b phi_b = lr * grad mean_b L_b(theta)``: with equal-sized tasks the
    mean of the task losses is the loss of the pooled points."""
    model = make_model()
    module = _module(Reptile, model, engine={"name": engine}, inner_lr=LR, **ONE_STEP[config])
    batch = make_batch(num_tasks=3, support=5)
    _, grads = _grads(module, batch)
    pooled = CONTINUOUS.elementwise_loss(
        model(batch.support_x.reshape(-1, 1)), batch.support_y.reshape(-1, 1)
    ).mean()
    expected = [LR * g for g in torch.autograd.grad(pooled, list(model.parameters()))]
    assert_all_close(grads, expected, what="Reptile meta-gradient")


@pytest.mark.parametrize("engine", ENGINES)
def test_reptile_one_step_with_padding_is_sgd_on_mean_task_loss(engine):
    """With padding each task's loss is the mean over its own real points."""
    model = make_model()
    module = _module(Reptile, model, engine={"name": engine}, inner_lr=LR, inner_steps=1)
    batch = make_batch(lengths=PADDED_LENGTHS)
    _, grads = _grads(module, batch)
    mean_loss = sum(_support_loss(model, batch, b) for b in range(3)) / 3
    expected = [LR * g for g in torch.autograd.grad(mean_loss, list(model.parameters()))]
    assert_all_close(grads, expected, what="Reptile meta-gradient")


REPTILE_SCHEDULES = {
    "steps3": ({"inner_steps": 3}, InnerSchedule(3)),
    "online1": ({"inner_steps": None, "inner_batch_size": 1}, InnerSchedule(None, 1)),
    "online2": ({"inner_steps": None, "inner_batch_size": 2}, InnerSchedule(None, 2)),
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("schedule", list(REPTILE_SCHEDULES))
def test_reptile_meta_gradient_is_theta_minus_mean_adapted(schedule, engine):
    """Several inner steps (padded batch): the meta-gradient is ``theta - mean_b phi_b``
    with ``phi_b`` from a hand-written SGD loop, and an outer SGD step of ``epsilon`` is
    exactly ``theta + epsilon (mean phi - theta)``."""
    model = make_model()
    kwargs, sched = REPTILE_SCHEDULES[schedule]
    module = _module(Reptile, model, engine={"name": engine}, inner_lr=LR, **kwargs)
    batch = make_batch(lengths=PADDED_LENGTHS)
    theta = [p.detach().clone() for p in model.parameters()]
    adapted = [_plain_sgd(model, batch, b, sched) for b in range(batch.num_tasks)]
    mean_phi = [torch.stack(phis).mean(0) for phis in zip(*adapted)]
    _, grads = _grads(module, batch)
    assert_all_close(grads, [t - m for t, m in zip(theta, mean_phi)], what="theta - mean phi")

    eps = 0.25
    optimizer = torch.optim.SGD(module.parameters(), lr=eps)
    optimizer.zero_grad()
    loss, _ = module.meta_loss(batch)
    loss.backward()
    optimizer.step()
    expected = [t + eps * (m - t) for t, m in zip(theta, mean_phi)]
    assert_all_close(list(model.parameters()), expected, rtol=1e-14, atol=1e-15, what="step")


def test_reptile_refuses_learned_inner_lr():
    with pytest.raises(ValueError, match="inner_lr_learned"):
        Reptile(make_model(), CONTINUOUS, inner_lr_learned="scalar")


# --------------------------------------------------------------------------------- MAML
@pytest.mark.parametrize("engine", ENGINES)
def test_maml_one_step_matches_closed_form(engine):
    """One inner step: ``d L_q(theta - a g_s(theta)) / d theta = (I - a H_s) g_q(phi)``,
    with the Hessian-vector product from plain double backward, per task."""
    model = make_model()
    module = _module(MAML, model, engine={"name": engine}, inner_lr=LR, inner_steps=1)
    batch = make_batch(lengths=PADDED_LENGTHS)
    _, grads = _grads(module, batch)
    params = list(model.parameters())
    expected = [torch.zeros_like(p) for p in params]
    for b in range(batch.num_tasks):
        g_s = torch.autograd.grad(_support_loss(model, batch, b), params, create_graph=True)
        phi = _plain_sgd(model, batch, b, InnerSchedule(1))
        net = copy.deepcopy(model)
        with torch.no_grad():
            for p, v in zip(net.parameters(), phi):
                p.copy_(v)
        query = CONTINUOUS.elementwise_loss(net(batch.query_x[b]), batch.query_y[b]).mean()
        g_q = torch.autograd.grad(query, list(net.parameters()))
        hvp = torch.autograd.grad(flat(g_s) @ flat(g_q), params)
        for e, gq, hv in zip(expected, g_q, hvp):
            e += (gq - LR * hv) / batch.num_tasks
    assert_all_close(grads, expected, what="one-step MAML meta-gradient")


MAML_CONFIGS = {
    "query_steps3": {"inner_steps": 3, "objective": "query"},
    "online1": {"inner_steps": None, "inner_batch_size": 1, "objective": "online"},
    "online2": {"inner_steps": None, "inner_batch_size": 2, "objective": "online"},
    "query_online1": {"inner_steps": None, "inner_batch_size": 1, "objective": "query"},
}


@pytest.mark.parametrize("learned", ["none", "per_parameter"])
@pytest.mark.parametrize("config", list(MAML_CONFIGS))
def test_maml_module_matches_finite_differences(config, learned):
    """The module's meta_loss (objective normalisation included) in random directions of
    (initial weights, learned rates)."""
    model = make_model()
    module = _module(MAML, model, inner_lr=LR, inner_lr_learned=learned, **MAML_CONFIGS[config])
    batch = make_batch(lengths=PADDED_LENGTHS)
    _, grads = _grads(module, batch)
    params = list(module.parameters())

    def fn():
        with torch.enable_grad():
            return module.meta_loss(batch)[0].detach()

    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
        expected = float(flat(grads) @ flat(direction))
        assert directional_fd(fn, params, direction) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fomaml"])
@pytest.mark.parametrize("learned", ["none", "per_parameter"])
@pytest.mark.parametrize("config", list(MAML_CONFIGS))
def test_maml_modules_agree_across_engines(config, learned, first_order):
    batch = make_batch(lengths=PADDED_LENGTHS)
    results = []
    for engine in ENGINES:
        module = _module(
            MAML,
            make_model(),
            engine={"name": engine},
            inner_lr=LR,
            inner_lr_learned=learned,
            first_order=first_order,
            **MAML_CONFIGS[config],
        )
        results.append(_grads(module, batch))
    (la, ga), (lb, gb) = results
    torch.testing.assert_close(la, lb, rtol=1e-10, atol=1e-12)
    assert_all_close(ga, gb, what="meta-gradient functional vs higher")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("learned", ["none", "per_tensor"])
@pytest.mark.parametrize("config", list(MAML_CONFIGS))
def test_fomaml_module_matches_hand_written_reference(config, learned, engine):
    model = make_model()
    kwargs = MAML_CONFIGS[config]
    module = _module(
        FOMAML, model, engine={"name": engine}, inner_lr=LR, inner_lr_learned=learned, **kwargs
    )
    batch = make_batch(lengths=PADDED_LENGTHS)
    _, grads = _grads(module, batch)
    lr_values = {
        n: (r.detach() if torch.is_tensor(r) else r)
        for n, r in module.inner_lr.rates_by_name().items()
    }
    sched = module.train_schedule
    expected, lr_grads = first_order_reference(model, batch, lr_values, sched, kwargs["objective"])
    expected = expected + reduce_lr_grads(module.inner_lr, lr_grads)
    if kwargs["objective"] == "online":
        # the module's online objective: summed element losses / number of real elements
        scale = 1.0 / batch.support_mask.sum().item()
        expected = [scale * e for e in expected]
    assert_all_close(grads, expected, what="first-order MAML meta-gradient")


# --------------------------------------------------------------------------- properties
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("config", ["query_steps3", "online1"])
def test_maml_meta_gradients_are_non_zero(config, engine):
    model = make_model()
    module = _module(
        MAML,
        model,
        engine={"name": engine},
        inner_lr=LR,
        inner_lr_learned="per_tensor",
        **MAML_CONFIGS[config],
    )
    _, grads = _grads(module, make_batch())
    names = [n for n, _ in module.named_parameters()]
    assert len(grads) == len(names) > len(list(model.parameters()))
    for name, g in zip(names, grads):
        assert torch.isfinite(g).all(), name
        assert g.abs().sum() > 1e-8, name


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("config", ["query_steps3", "online1"])
def test_first_order_differs_from_second_order(config, engine):
    """Same meta-loss value (the forward pass is identical), different gradients."""
    batch = make_batch()
    out = {}
    for first_order in (False, True):
        module = _module(
            MAML,
            make_model(),
            engine={"name": engine},
            inner_lr=LR,
            first_order=first_order,
            **MAML_CONFIGS[config],
        )
        out[first_order] = _grads(module, batch)
    (l2, g2), (l1, g1) = out[False], out[True]
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=0)
    diff = (flat(g2) - flat(g1)).norm() / flat(g2).norm()
    assert diff > 1e-3


@pytest.mark.parametrize("engine", ENGINES)
def test_adaptation_lowers_the_support_loss(engine):
    """A few inner steps with a small rate lower each task's support loss; evaluation
    (with the support points as query) sees it too."""
    model = make_model()
    module = _module(
        MAML, model, engine={"name": engine}, inner_lr=0.05, inner_steps=5, eval_inner_steps=5
    )
    batch = make_batch(query=None)
    result = module.adapt(batch, "second_order")
    losses = result.step_losses.detach()
    assert (losses[:, 1:] < losses[:, :-1]).all(), losses
    as_query = TaskBatch(batch.support_x, batch.support_y, None, batch.support_x, batch.support_y)
    curve = module.evaluate_batch(as_query)
    assert curve.shape == (3, 6) and not curve.requires_grad
    assert (curve[:, -1] < curve[:, 0]).all(), curve
    torch.testing.assert_close(curve[:, :-1], losses, rtol=1e-12, atol=0)
