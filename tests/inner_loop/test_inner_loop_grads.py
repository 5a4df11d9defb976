"""Float64 gradient correctness of the inner-loop engines.

* second-order MAML meta-gradients (initial weights and learned inner rates) against
  central finite differences, through several inner steps, for the query objective and
  the online objective ``element_losses.sum()``;
* first-order MAML against a hand-written per-task SGD loop;
* the ``functional`` engine against the ``higher`` engine: losses, adapted parameters and
  meta-gradients, for every schedule, grad mode and learned-rate mode (per-unit rates
  included; inner momentum: :mod:`test_unit_rates_momentum`), with and without
  padding (which must change nothing). Every body and output kind, on every engine:
  :mod:`test_parity`.
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import (
    CLASSES,
    CONTINUOUS,
    FUNCTIONAL,
    HIGHER,
    ONLINE_1,
    ONLINE_2,
    PADDED_LENGTHS,
    QUERY_SCHEDULE,
    assert_all_close,
    directional_fd,
    entrywise_fd,
    first_order_reference,
    flat,
    make_batch,
    make_lr,
    make_model,
    meta_grads,
    reduce_lr_grads,
    run_objective,
    unpadded_task,
    wrt,
)

from reptile_gen.inner_loop import InnerSchedule
from reptile_gen.models import MLP, LSTMBlockStack

SCHEDULES = {"query3": QUERY_SCHEDULE, "online1": ONLINE_1, "online2": ONLINE_2}
#: (objective, schedule): the few-shot query objective and the online NLL, plus the two
#: mixed cases (query after online adaptation, online losses of a few-shot schedule)
CASES = [
    ("query", "query3"),
    ("online", "online1"),
    ("online", "online2"),
    ("query", "online1"),
    ("online", "query3"),
]
PADDED = PADDED_LENGTHS
FD_RTOL, FD_ATOL = 1e-6, 1e-8


def _fd_fn(model, batch, lr, schedule, kind, spec=CONTINUOUS):
    def fn():
        with torch.enable_grad():
            return run_objective(FUNCTIONAL, model, batch, lr, schedule, kind, "none", spec)

    return fn


# ----------------------------------------------------------------------------------- FD
def _random_directions(params, count, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(count):
        yield [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


def _check_directions(fn, params, grads, count=3, seed=3):
    for direction in _random_directions(params, count, seed):
        expected = float(flat(grads) @ flat(direction))
        assert directional_fd(fn, params, direction) == pytest.approx(expected, rel=FD_RTOL)


@pytest.mark.parametrize("kind,schedule", [("query", "query3"), ("online", "online1")])
def test_second_order_matches_entrywise_finite_differences(kind, schedule):
    """Every entry of every initial weight, through 3 (query) or 5 (online) inner steps,
    on a padded batch (task 0 is full length)."""
    model = make_model(body=functools.partial(MLP, hidden_sizes=[4, 4], activation="tanh"))
    batch = make_batch(lengths=PADDED)
    lr = make_lr(model)
    sched = SCHEDULES[schedule]
    assert len(sched.slices(5)) >= 3
    _, grads = meta_grads(FUNCTIONAL, model, batch, lr, sched, kind, "second_order")
    params = list(model.parameters())
    fd = entrywise_fd(_fd_fn(model, batch, lr, sched, kind), params)
    assert_all_close(grads, fd, rtol=FD_RTOL, atol=FD_ATOL, what="d objective / d theta")
    assert flat(grads).abs().max() > 1e-3


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("kind,schedule", CASES)
def test_second_order_matches_directional_finite_differences(kind, schedule, padded):
    model = make_model()
    batch = make_batch(lengths=PADDED if padded else None)
    lr = make_lr(model)
    sched = SCHEDULES[schedule]
    _, grads = meta_grads(FUNCTIONAL, model, batch, lr, sched, kind, "second_order")
    fn = _fd_fn(model, batch, lr, sched, kind)
    _check_directions(fn, list(model.parameters()), grads)


@pytest.mark.parametrize("learned", ["scalar", "per_tensor", "per_parameter", "per_unit"])
@pytest.mark.parametrize("kind,schedule", CASES[:3])
def test_learned_inner_lr_second_order_matches_finite_differences(learned, kind, schedule):
    model = make_model()
    batch = make_batch(lengths=PADDED)
    lr = make_lr(model, learned)
    sched = SCHEDULES[schedule]
    _, grads = meta_grads(FUNCTIONAL, model, batch, lr, sched, kind, "second_order")
    n_model = len(list(model.parameters()))
    lr_params = list(lr.parameters())
    fn = _fd_fn(model, batch, lr, sched, kind)
    if learned == "per_parameter":  # as many rates as weights: random directions
        _check_directions(fn, lr_params, grads[n_model:], count=4)
    else:  # every rate
        fd = entrywise_fd(fn, lr_params)
        assert_all_close(grads[n_model:], fd, rtol=FD_RTOL, atol=FD_ATOL, what="d obj / d lr")
    assert flat(grads[n_model:]).abs().min() > 0
    # the initial weights, with the rates learned
    _check_directions(fn, list(model.parameters()), grads[:n_model], count=2)


@pytest.mark.parametrize("kind,schedule", CASES[:3])
def test_second_order_directional_derivatives_jointly(kind, schedule):
    """Random directions in (initial weights, per-parameter rates) at once, on a model
    with every body feature (LSTM block with an input layer and LayerNorm)."""
    body = functools.partial(LSTMBlockStack, hidden_sizes=[4], input_layer=3, layer_norm=True)
    model = make_model(body=body)
    batch = make_batch(lengths=PADDED)
    lr = make_lr(model, "per_parameter")
    sched = SCHEDULES[schedule]
    _, grads = meta_grads(FUNCTIONAL, model, batch, lr, sched, kind, "second_order")
    fn = _fd_fn(model, batch, lr, sched, kind)
    _check_directions(fn, wrt(model, lr), grads, count=4, seed=4)


# -------------------------------------------------------------------- first-order MAML
@pytest.mark.parametrize("engine", [FUNCTIONAL, HIGHER], ids=lambda e: e.name)
@pytest.mark.parametrize("learned", ["none", "scalar", "per_tensor", "per_parameter", "per_unit"])
@pytest.mark.parametrize("kind,schedule", CASES)
def test_first_order_matches_hand_written_reference(kind, schedule, learned, engine):
    """On a padded batch (task 0 full length, tasks 1 and 2 padded)."""
    model = make_model()
    batch = make_batch(lengths=PADDED)
    lr = make_lr(model, learned)
    sched = SCHEDULES[schedule]
    _, grads = meta_grads(engine, model, batch, lr, sched, kind, "first_order")
    lr_values = {
        n: (r.detach() if torch.is_tensor(r) else r) for n, r in lr.rates_by_name().items()
    }
    expected, lr_grads = first_order_reference(model, batch, lr_values, sched, kind)
    expected = expected + reduce_lr_grads(lr, lr_grads)
    assert_all_close(grads, expected, what="first-order meta-gradient")


# ------------------------------------------------------------------ engine vs engine
def _compare_results(a, b, what):
    for field in ("step_losses", "element_losses", "query_losses"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None), field
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12, msg=f"{what}: {field}")
    if a.adapted is not None:
        assert a.adapted.keys() == b.adapted.keys()
        for name in a.adapted:
            torch.testing.assert_close(
                a.adapted[name], b.adapted[name], rtol=1e-10, atol=1e-12, msg=f"{what}: {name}"
            )


def _run(engine, model, batch, lr, schedule, grad_mode, spec=CONTINUOUS, **kw):
    return engine.run(model, batch, spec.elementwise_loss, lr, schedule, grad_mode, **kw)


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_engines_agree_on_losses_and_adapted_params(schedule, padded):
    """What Reptile uses (no graph): losses along the way and the adapted weights."""
    model = make_model()
    batch = make_batch(lengths=PADDED if padded else None)
    lr = make_lr(model)
    sched = SCHEDULES[schedule]
    kw = {"track_query": True, "return_adapted": True}
    with torch.enable_grad():
        a = _run(FUNCTIONAL, model, batch, lr, sched, "none", **kw)
        b = _run(HIGHER, model, batch, lr, sched, "none", **kw)
    _compare_results(a, b, f"{schedule}")
    assert a.query_losses.shape == (3, len(sched.slices(5)) + 1)


@pytest.mark.parametrize("learned", ["none", "scalar", "per_tensor", "per_parameter", "per_unit"])
@pytest.mark.parametrize("grad_mode", ["second_order", "first_order"])
@pytest.mark.parametrize("kind,schedule", CASES)
def test_engines_agree_on_meta_gradients(kind, schedule, grad_mode, learned):
    """On a padded batch (task 0 full length, tasks 1 and 2 padded)."""
    model = make_model()
    batch = make_batch(lengths=PADDED)
    lr = make_lr(model, learned)
    sched = SCHEDULES[schedule]
    va, ga = meta_grads(FUNCTIONAL, model, batch, lr, sched, kind, grad_mode)
    vb, gb = meta_grads(HIGHER, model, batch, lr, sched, kind, grad_mode)
    torch.testing.assert_close(va, vb, rtol=1e-10, atol=1e-12)
    assert_all_close(ga, gb, what=f"{grad_mode} meta-gradient")


@pytest.mark.parametrize("schedule", ["online1", "online2"])
def test_engines_agree_on_discrete_classes_task(schedule):
    """Discrete coordinates (embeddings) and cross-entropy, online, as the text task."""
    model = make_model(CLASSES)
    batch = make_batch(CLASSES, num_tasks=2, support=5, lengths=[5, 2])
    lr = make_lr(model, "per_tensor")
    sched = SCHEDULES[schedule]
    for grad_mode in ("second_order", "first_order"):
        va, ga = meta_grads(FUNCTIONAL, model, batch, lr, sched, "online", grad_mode, CLASSES)
        vb, gb = meta_grads(HIGHER, model, batch, lr, sched, "online", grad_mode, CLASSES)
        torch.testing.assert_close(va, vb, rtol=1e-10, atol=1e-12)
        assert_all_close(ga, gb, what=f"{grad_mode} meta-gradient")
    kw = {"track_query": True, "return_adapted": True}
    with torch.enable_grad():
        a = _run(FUNCTIONAL, model, batch, lr, sched, "none", CLASSES, **kw)
        b = _run(HIGHER, model, batch, lr, sched, "none", CLASSES, **kw)
    _compare_results(a, b, schedule)


# ---------------------------------------------------------------------------- padding
@pytest.mark.parametrize("engine", [FUNCTIONAL, HIGHER], ids=lambda e: e.name)
@pytest.mark.parametrize("grad_mode", ["second_order", "first_order"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_padding_changes_nothing(schedule, grad_mode, engine):
    """Each task of a padded batch gives the losses, adapted weights and meta-gradients
    of the same task alone without its padding elements."""
    model = make_model()
    batch = make_batch(lengths=PADDED)
    lr = make_lr(model, "per_tensor")
    sched = SCHEDULES[schedule]
    kw = {"track_query": True, "return_adapted": True}
    with torch.enable_grad():
        padded = _run(engine, model, batch, lr, sched, "none", **kw)
    steps = len(sched.slices(5))
    for b, n in enumerate(PADDED):
        with torch.enable_grad():
            alone = _run(engine, model, unpadded_task(batch, b), lr, sched, "none", **kw)
        real = len(sched.slices(n))

        def close(x, y, what, b=b):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14, msg=f"task {b}: {what}")

        close(padded.element_losses[b, :n], alone.element_losses[0], "element losses")
        close(padded.element_losses[b, n:], torch.zeros(5 - n, dtype=torch.float64), "padding")
        close(padded.step_losses[b, :real], alone.step_losses[0], "step losses")
        close(padded.step_losses[b, real:], torch.zeros(steps - real, dtype=torch.float64), "pad")
        # padding steps leave the weights (and so the query loss) where they were
        close(padded.query_losses[b, : real + 1], alone.query_losses[0], "query losses")
        close(
            padded.query_losses[b, real:], alone.query_losses[0, -1].expand(steps - real + 1), "q"
        )
        for name, phi in padded.adapted.items():
            close(phi[b], alone.adapted[name][0], name)

    for kind in ("query", "online"):
        _, grads = meta_grads(engine, model, batch, lr, sched, kind, grad_mode)
        expected = [torch.zeros_like(g) for g in grads]
        for b in range(len(PADDED)):
            _, g = meta_grads(engine, model, unpadded_task(batch, b), lr, sched, kind, grad_mode)
            scale = 1 / len(PADDED) if kind == "query" else 1.0  # the query objective is a mean
            expected = [e + scale * x for e, x in zip(expected, g)]
        assert_all_close(grads, expected, what=f"{kind} meta-gradient of the padded batch")


def test_all_padding_step_is_a_no_op():
    """A task made only of padding elements: nothing moves, every online loss is 0."""
    model = make_model()
    batch = make_batch(lengths=[5, 0, 2])
    lr = make_lr(model, "scalar")
    theta = dict(model.named_parameters())
    for engine in (FUNCTIONAL, HIGHER):
        for sched in SCHEDULES.values():
            with torch.enable_grad():
                r = _run(engine, model, batch, lr, sched, "none", return_adapted=True)
            assert r.element_losses[1].abs().max() == 0
            assert r.step_losses[1].abs().max() == 0
            for name, phi in r.adapted.items():
                assert torch.equal(phi[1], theta[name].detach()), name


def test_schedule_shapes():
    assert InnerSchedule(num_steps=3).slices(5) == [(0, 5)] * 3
    assert ONLINE_1.slices(3) == [(0, 1), (1, 2), (2, 3)]
    assert ONLINE_2.slices(5) == [(0, 2), (2, 4), (4, 5)]


def test_body_layer_norm_is_nn_layer_norm():
    """The composite LayerNorm of the bodies (see its docstring) computes what
    ``nn.LayerNorm`` does, with the same parameters and state dict."""
    from reptile_gen.models.bodies import LayerNorm

    ours, ref = LayerNorm(6).double(), torch.nn.LayerNorm(6).double()
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 4, 6, dtype=torch.float64) * 3 + 1
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)
    plain = LayerNorm(6, elementwise_affine=False).double()
    assert list(plain.state_dict()) == []
    torch.testing.assert_close(plain(x), torch.nn.functional.layer_norm(x, (6,)))
