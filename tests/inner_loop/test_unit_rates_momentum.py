"""Per-unit learned rates (``inner_lr_learned=per_unit``) and inner momentum
(``algorithm.inner_momentum``) in float64, on an MLP and a gated MLP body.

* The core's heavy-ball step is ``torch.optim.SGD``'s (momentum, no dampening), and each
  engine's adapted weights with momentum are a hand-run ``torch.optim.SGD`` per task
  (steps that are all padding skipped, as an optimizer that is not stepped).
* Every engine that runs an option gives the generic ``torch.func`` path's losses,
  adapted weights (Reptile) and meta-gradients (first-order, second-order, checkpointed
  and truncated MAML), with the exact ones checked against central finite differences;
  ``higher`` runs momentum through its own differentiable SGD, so the functional engine
  is checked against an independent implementation. The low-rank engine runs per-unit
  rates and refuses momentum; the compiled program refuses momentum.
"""

from __future__ import annotations

import copy
import functools
import re

import pytest
import torch
from helpers import (
    CLASSES,
    CONTINUOUS,
    ONLINE_2,
    PARITY_ENGINES,
    PARITY_MODES,
    QUERY_SCHEDULE,
    assert_all_close,
    assert_matches_reference,
    jitter_rates,
    make_batch,
    make_model,
)

from reptile_gen.algorithms import MAML
from reptile_gen.inner_loop import InnerLR, make_engine
from reptile_gen.inner_loop.core import check_momentum, momentum_step, unit_shape
from reptile_gen.inner_loop.core.guard import describe_rates
from reptile_gen.models import MLP, GatedMLP

LENGTHS = [6, 3, 5]  # task 1 has an all-padding step with two elements per step
BODIES = {
    "mlp": functools.partial(MLP, hidden_sizes=[5, 4], activation="tanh"),
    "gated_mlp": functools.partial(GatedMLP, hidden_sizes=[5]),
}
#: option -> (learned, momentum)
OPTIONS = {
    "per_unit": ("per_unit", 0.0),
    "momentum": ("none", 0.7),
    "per_unit_momentum": ("per_unit", 0.5),
}
OBJECTIVES = {"online": (ONLINE_2, None), "query": (QUERY_SCHEDULE, 4)}
MODES = PARITY_MODES
ENGINES = PARITY_ENGINES


def make_rates(model, learned: str, momentum: float, schedule="constant", seed=3) -> InnerLR:
    """Rates of ``model``'s tensors; learned ones jittered so that every entry differs."""
    shapes = [(n, p.shape) for n, p in model.named_parameters()]
    lr = InnerLR(shapes, 0.1, learned, schedule, 0.4, horizon=3, momentum=momentum).double()
    return jitter_rates(lr, seed)


# --------------------------------------------------------------------------- the update
def test_the_momentum_step_is_torch_sgd_with_momentum():
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(4, 3, generator=g, dtype=torch.float64)
    grads = [torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(5)]
    ref = p0.clone().requires_grad_()
    opt = torch.optim.SGD([ref], lr=0.3, momentum=0.8)
    p, v = p0, torch.zeros_like(p0)
    for gi in grads:
        ref.grad = gi.clone()
        opt.step()
        p, v = momentum_step(p, v, gi, 0.3, 0.8)
        torch.testing.assert_close(p, ref.detach(), rtol=1e-14, atol=1e-14)
    # a task whose step is all padding keeps its parameters and velocity
    batched_p, batched_v = torch.stack([p, p]), torch.stack([v, v])
    active = torch.tensor([True, False])
    new_p, new_v = momentum_step(batched_p, batched_v, torch.stack(grads[:2]), 0.3, 0.8, active)
    assert torch.equal(new_p[1], p) and torch.equal(new_v[1], v)
    assert not torch.equal(new_p[0], p)


def test_unit_shape_and_per_unit_rates():
    assert unit_shape((7, 3)) == (7, 1)
    assert unit_shape((7,)) == (7,)
    assert unit_shape((2, 3, 4)) == (2, 1, 1)
    assert unit_shape(()) == ()
    model = make_model(body=BODIES["mlp"])
    lr = make_rates(model, "per_unit", 0.0)
    for name, p in model.named_parameters():
        assert lr.rates_by_name()[name].shape == unit_shape(p.shape), name


@pytest.mark.parametrize("beta", [-0.1, 1.0, 1.5, float("nan"), "0.5", True])
def test_momentum_out_of_range_is_a_clear_error(beta):
    message = f"algorithm.inner_momentum={beta!r}; must be a number >= 0 and < 1"
    with pytest.raises(ValueError, match=re.escape(message)):
        check_momentum(beta)
    with pytest.raises(ValueError, match=re.escape(message)):
        MAML(make_model(), CONTINUOUS, inner_momentum=beta)


def hand_momentum_sgd(model, batch, spec, lr: InnerLR, schedule):
    """Each task's inner loop by ``torch.optim.SGD(momentum=beta)`` (autograd per task;
    a step with no real element is not taken); returns ``{name: [B, ...]}``."""
    rates = {n: r.detach() if torch.is_tensor(r) else r for n, r in lr.rates_by_name().items()}
    out = []
    for b in range(batch.num_tasks):
        net = copy.deepcopy(model)
        names = [n for n, _ in net.named_parameters()]
        # the rate enters as the gradient's scale with lr=1: SGD's buffer is the plain
        # gradient's, so a tensor rate r is the same as p - r * v
        velocity = {n: None for n in names}
        for start, end in schedule.slices(batch.support_x.shape[1]):
            m = batch.support_mask[b, start:end]
            if not bool(m.any()):
                continue
            x, y = batch.support_x[b, start:end][m], batch.support_y[b, start:end][m]
            loss = spec.elementwise_loss(net(x), y).mean()
            grads = torch.autograd.grad(loss, list(net.parameters()))
            with torch.no_grad():
                for (n, p), gi in zip(net.named_parameters(), grads):
                    opt = torch.optim.SGD([p], lr=1.0, momentum=lr.momentum)
                    if velocity[n] is not None:
                        opt.state[p]["momentum_buffer"] = velocity[n]
                    p.grad = gi
                    # torch's step is p -= lr * buf; ours scales the buffer by the rate
                    before = p.clone()
                    opt.step()
                    velocity[n] = opt.state[p]["momentum_buffer"]
                    p.copy_(before - rates[n] * velocity[n])
        out.append({n: p.detach() for n, p in net.named_parameters()})
    return {n: torch.stack([o[n] for o in out]) for n in out[0]}


@pytest.mark.parametrize("engine", ["functional", "functional_vmap", "higher"])
@pytest.mark.parametrize("option", ["momentum", "per_unit_momentum"])
def test_momentum_is_torch_sgd_per_task(engine, option):
    spec = CLASSES
    model = make_model(spec, BODIES["mlp"])
    batch = make_batch(spec, num_tasks=3, support=6, query=None, lengths=LENGTHS)
    lr = make_rates(model, *OPTIONS[option])
    want = hand_momentum_sgd(model, batch, spec, lr, ONLINE_2)
    got = ENGINES[engine]().run(
        model, batch, spec.elementwise_loss, lr, ONLINE_2, "none", return_adapted=True
    )
    assert_all_close(list(got.adapted.values()), list(want.values()), what=engine)


# ------------------------------------------------------------------- engine against engine
@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("body", list(BODIES))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("engine", list(ENGINES))
def test_engine_matches_the_generic_path(engine, mode, body, option, objective):
    grad_mode, options = MODES[mode]
    if engine == "higher" and mode == "checkpointed":
        pytest.skip("higher has no checkpointing")
    learned, momentum = OPTIONS[option]
    schedule, query = OBJECTIVES[objective]
    spec = CONTINUOUS
    model = make_model(spec, BODIES[body])
    batch = make_batch(spec, num_tasks=3, support=6, query=query, lengths=LENGTHS)
    lr = make_rates(model, learned, momentum)
    if engine == "lowrank" and momentum:
        message = f"algorithm.inner_momentum={momentum} with engine=lowrank: "
        with pytest.raises(ValueError, match=re.escape(message)):
            ENGINES[engine](inner_momentum=momentum, **options)
        with pytest.raises(ValueError, match=re.escape(message)):  # the engine run directly
            ENGINES[engine](**options).run(
                model, batch, spec.elementwise_loss, lr, schedule, grad_mode
            )
        return
    fd = mode in ("second_order", "checkpointed") and engine != "higher"
    assert_matches_reference(
        ENGINES[engine](**options), options, model, batch, lr, schedule, objective, grad_mode,
        spec, what=f"{engine} {mode} {body} {option} {objective}", every_row=True,
        fd_rtol=1e-6 if fd else None,
    )  # fmt: skip


# ------------------------------------------------------------------------------ refusals
def test_the_compiled_program_refuses_momentum():
    message = "algorithm.inner_momentum=0.5 with engine.compile=True: the compiled program"
    with pytest.raises(ValueError, match=re.escape(message)):
        make_engine("functional", compile=True, inner_momentum=0.5)
    with pytest.raises(ValueError, match=re.escape(message)):
        MAML(make_model(), CONTINUOUS, engine={"name": "functional", "compile": True},
             inner_momentum=0.5)  # fmt: skip


def test_higher_momentum_is_sgds_own():
    message = "algorithm.inner_momentum=0.5 with engine.inner_optimizer={name: adam}"
    with pytest.raises(ValueError, match=re.escape(message)):
        make_engine("higher", {"name": "adam"}, inner_momentum=0.5)
    message = "algorithm.inner_momentum=0.5 with engine.inner_optimizer={name: sgd, momentum: 0.9}"
    with pytest.raises(ValueError, match=re.escape(message)):
        make_engine("higher", {"name": "sgd", "momentum": 0.9}, inner_momentum=0.5)


def test_the_divergence_message_names_the_momentum():
    model = make_model()
    shapes = [(n, p.shape) for n, p in model.named_parameters()]
    assert describe_rates(InnerLR(shapes, 0.1, momentum=0.9)) == "inner_lr=0.1, inner_momentum=0.9"
    assert describe_rates(InnerLR(shapes, 0.1)) == "inner_lr=0.1"
    scheduled = describe_rates(InnerLR(shapes, 0.1, "per_unit", "linear", horizon=3, momentum=0.5))
    assert scheduled.startswith("inner_lr_schedule=linear of learned (per_unit) in [0.1, 0.1]")
    assert scheduled.endswith(", inner_momentum=0.5")
