"""Long second-order unrolls in float64: segment checkpointing and truncation.

* checkpointing (``checkpoint_segments``: ``auto``, a count that divides the number of
  inner steps, one that does not, one larger than it) gives the full unroll's losses and
  meta-gradients (initial weights and learned inner rates), for the online objective and
  the query objective, and runs one recomputed segment per segment;
* truncation to the last ``k`` updates equals the full unroll when ``k >= N``,
  first-order MAML when ``k = 0``, the ``higher`` engine's truncation, and a hand-written
  unroll whose first ``N - k`` inner gradients are detached; checkpointing on top of
  truncation changes nothing;
* the options are clear config errors where they make no sense (Reptile, first-order
  MAML, the ``higher`` engine) and for invalid values.
"""

from __future__ import annotations

import re

import pytest
import torch
from helpers import (
    CONTINUOUS,
    FUNCTIONAL,
    assert_all_close,
    flat,
    make_batch,
    make_lr,
    make_model,
    meta_grads,
    wrt,
)
from torch.func import functional_call

from reptile_gen.algorithms import MAML
from reptile_gen.inner_loop import InnerSchedule, make_engine
from reptile_gen.inner_loop.core import first_visit
from reptile_gen.inner_loop.core.recompute import RecomputedSegment
from reptile_gen.inner_loop.functional import FunctionalEngine, num_segments
from reptile_gen.utils.instantiate import build_run

#: (objective, schedule, batch): 12 online steps on padded sequences (tasks end after 12,
#: 9 and 11 elements), or 7 few-shot steps on 4 support points scored on a query set
SETUPS = {
    "online": ("online", InnerSchedule(None, 1), {"support": 12, "lengths": [12, 9, 11]}),
    "query": ("query", InnerSchedule(num_steps=7), {"support": 4, "query": 5}),
}
#: auto (4 segments of 12 steps, 3 of 7), 3 (divides 12, not 7), 5 (divides neither),
#: 50 (more than the steps: one step per segment)
SEGMENTS = ["auto", 3, 5, 50]
LR_INIT = 0.15


def _setup(name: str, learned: str = "none"):
    kind, schedule, shape = SETUPS[name]
    model = make_model()
    batch = make_batch(**shape)
    lr = make_lr(model, learned, init=LR_INIT)
    num_steps = len(schedule.slices(batch.support_x.shape[1]))
    return kind, schedule, model, batch, lr, num_steps


def _grads(engine, name, learned="none", grad_mode="second_order"):
    kind, schedule, model, batch, lr, _ = _setup(name, learned)
    return meta_grads(engine, model, batch, lr, schedule, kind, grad_mode)


@pytest.fixture
def count_segments(monkeypatch):
    """The number of checkpointed segments run since the fixture was made."""
    calls = []
    original = RecomputedSegment.apply

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(RecomputedSegment, "apply", counting)
    return calls


# ------------------------------------------------------------------------ checkpointing
def test_num_segments():
    assert num_segments(None, 784) == 1
    assert num_segments("auto", 784) == 28
    assert num_segments("auto", 12) == 4
    assert num_segments("auto", 7) == 3
    assert num_segments("auto", 1) == 1
    assert num_segments(5, 12) == 5
    assert num_segments(50, 12) == 12
    assert num_segments(1, 12) == 1


@pytest.mark.parametrize(
    ("segments", "learned"),
    [(s, "none") for s in SEGMENTS] + [("auto", "scalar"), (5, "per_parameter")],
)
@pytest.mark.parametrize("setup", list(SETUPS))
def test_checkpointed_meta_gradients_equal_the_full_unroll(
    setup, segments, learned, count_segments
):
    value, grads = _grads(FUNCTIONAL, setup, learned)
    assert not count_segments
    engine = FunctionalEngine(checkpoint_segments=segments)
    value_ckpt, grads_ckpt = _grads(engine, setup, learned)
    num_steps = _setup(setup)[-1]
    assert len(count_segments) == num_segments(segments, num_steps) > 1
    torch.testing.assert_close(value_ckpt, value, rtol=1e-12, atol=1e-14)
    assert_all_close(grads_ckpt, grads, what=f"checkpoint_segments={segments}")
    assert flat(grads).abs().max() > 1e-3
    if learned != "none":
        n_model = len(list(make_model().parameters()))
        assert flat(grads[n_model:]).abs().min() > 0


@pytest.mark.parametrize("setup", list(SETUPS))
def test_checkpointed_losses_along_the_way_equal_the_full_unroll(setup, count_segments):
    """Step, element and per-step query losses (``track_query``), and the gradient of the
    summed per-step query losses (it flows through every segment's query output)."""
    kind, schedule, model, batch, lr, _ = _setup(setup, "per_tensor")
    query_batch = make_batch(support=12, lengths=[12, 9, 11], query=3)
    outs = []
    for engine in (FUNCTIONAL, FunctionalEngine(checkpoint_segments=5)):
        result = engine.run(
            model,
            query_batch,
            CONTINUOUS.elementwise_loss,
            lr,
            schedule,
            "second_order",
            track_query=True,
            return_adapted=True,
        )
        total = result.query_losses.sum() + result.element_losses.sum()
        outs.append((result, torch.autograd.grad(total, wrt(model, lr))))
    assert len(count_segments) == 5
    (full, g_full), (ckpt, g_ckpt) = outs
    for field in ("step_losses", "element_losses", "query_losses"):
        torch.testing.assert_close(getattr(ckpt, field), getattr(full, field), rtol=1e-12, atol=0)
    for name in full.adapted:
        torch.testing.assert_close(ckpt.adapted[name], full.adapted[name], rtol=1e-12, atol=0)
    assert_all_close(g_ckpt, g_full, what="d (query + online losses)")


def test_checkpointing_is_skipped_without_a_second_order_graph(count_segments):
    """First-order and no-graph runs, and runs under ``no_grad``, keep nothing to
    recompute: no checkpointed segment, same results."""
    engine = FunctionalEngine(checkpoint_segments="auto")
    value, grads = _grads(engine, "online", "scalar", "first_order")
    value_ref, grads_ref = _grads(FUNCTIONAL, "online", "scalar", "first_order")
    torch.testing.assert_close(value, value_ref, rtol=1e-12, atol=0)
    assert_all_close(grads, grads_ref, what="first_order")
    kind, schedule, model, batch, lr, _ = _setup("online")
    for grad_mode, context in (("none", torch.enable_grad), ("second_order", torch.no_grad)):
        with context():
            ours = engine.run(model, batch, CONTINUOUS.elementwise_loss, lr, schedule, grad_mode)
            ref = FUNCTIONAL.run(model, batch, CONTINUOUS.elementwise_loss, lr, schedule, grad_mode)
        torch.testing.assert_close(ours.element_losses, ref.element_losses, rtol=1e-12, atol=0)
    assert not count_segments


# --------------------------------------------------------------------------- truncation
def truncated_reference(model, batch, lr, schedule, kind, k):
    """Second-order MAML by hand with plain ``torch.autograd``, one task at a time: the
    inner gradients of the first ``N - k`` steps are detached (constants), the last ``k``
    are differentiated through (``create_graph``). Returns the meta-gradient w.r.t.
    :func:`wrt` (initial weights, then learned rates)."""
    names = [n for n, _ in model.named_parameters()]
    theta = [p for _, p in model.named_parameters()]
    rates = lr.rates_by_name()
    loss_fn = CONTINUOUS.elementwise_loss
    slices = schedule.slices(batch.support_x.shape[1])
    records = first_visit(slices)
    first_order_before = max(len(slices) - k, 0)
    total = torch.zeros((), dtype=torch.float64)
    for b in range(batch.num_tasks):
        params = dict(zip(names, theta))
        for i, ((start, end), record) in enumerate(zip(slices, records)):
            m = batch.support_mask[b, start:end]
            x, y = batch.support_x[b, start:end][m], batch.support_y[b, start:end][m]
            if x.shape[0] == 0:  # only padding: no loss, no step
                continue
            elements = loss_fn(functional_call(model, params, (x,)), y)
            if kind == "online" and record:
                total = total + elements.sum()
            differentiate = i >= first_order_before
            g = torch.autograd.grad(
                elements.mean(),
                list(params.values()),
                create_graph=differentiate,
                retain_graph=True,
            )
            if not differentiate:
                g = [t.detach() for t in g]
            params = {n: params[n] - rates[n] * gn for n, gn in zip(names, g)}
        if kind == "query":
            out = functional_call(model, params, (batch.query_x[b],))
            total = total + loss_fn(out, batch.query_y[b]).mean() / batch.num_tasks
    wanted = wrt(model, lr)
    grads = torch.autograd.grad(total, wanted, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(wanted, grads)]


@pytest.mark.parametrize("extra", [0, 3])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_truncation_to_at_least_all_steps_is_the_full_unroll(setup, extra):
    num_steps = _setup(setup)[-1]
    _, full = _grads(FUNCTIONAL, setup, "scalar")
    for engine in ("functional", "higher"):
        _, grads = _grads(make_engine(engine, truncate_steps=num_steps + extra), setup, "scalar")
        assert_all_close(grads, full, what=f"{engine} truncate_steps={num_steps + extra}")


@pytest.mark.parametrize("setup", list(SETUPS))
def test_truncation_to_zero_steps_is_first_order_maml(setup):
    """Also ``k = 1`` for the online objective: the last update precedes no online loss,
    so differentiating through it alone changes nothing."""
    _, first_order = _grads(FUNCTIONAL, setup, "per_tensor", "first_order")
    for k in (0, 1) if setup == "online" else (0,):
        for engine in ("functional", "higher"):
            _, grads = _grads(make_engine(engine, truncate_steps=k), setup, "per_tensor")
            assert_all_close(grads, first_order, what=f"{engine} truncate_steps={k}")


@pytest.mark.parametrize("learned", ["none", "per_parameter"])
@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_truncation_equals_higher_engine_and_hand_written_reference(setup, k, learned):
    kind, schedule, model, batch, lr, num_steps = _setup(setup, learned)
    assert 0 < k < num_steps
    _, grads = meta_grads(
        make_engine("functional", truncate_steps=k),
        model,
        batch,
        lr,
        schedule,
        kind,
        "second_order",
    )
    _, grads_higher = meta_grads(
        make_engine("higher", truncate_steps=k), model, batch, lr, schedule, kind, "second_order"
    )
    expected = truncated_reference(model, batch, lr, schedule, kind, k)
    assert_all_close(grads, expected, what=f"functional truncate_steps={k} vs hand-written")
    assert_all_close(grads_higher, expected, what=f"higher truncate_steps={k} vs hand-written")
    # and it is neither the full unroll nor first-order MAML
    _, full = meta_grads(FUNCTIONAL, model, batch, lr, schedule, kind, "second_order")
    _, first = meta_grads(FUNCTIONAL, model, batch, lr, schedule, kind, "first_order")
    for other in (full, first):
        assert (flat(grads) - flat(other)).abs().max() > 1e-6


@pytest.mark.parametrize(("segments", "k"), [("auto", 4), (3, 1), (5, 6), (50, 2)])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_checkpointing_with_truncation_equals_truncation_alone(setup, segments, k):
    value, grads = _grads(make_engine("functional", truncate_steps=k), setup, "scalar")
    engine = make_engine("functional", checkpoint_segments=segments, truncate_steps=k)
    value_ckpt, grads_ckpt = _grads(engine, setup, "scalar")
    torch.testing.assert_close(value_ckpt, value, rtol=1e-12, atol=1e-14)
    assert_all_close(grads_ckpt, grads, what=f"checkpoint_segments={segments}, truncate={k}")


def test_meta_learner_passes_the_options_to_the_engine():
    """``MAML(checkpoint_segments=..., truncate_steps=...)`` gives the meta-gradient of
    the engine built with them."""
    kind, schedule, model, batch, lr, _ = _setup("online")
    module = MAML(
        model,
        CONTINUOUS,
        inner_lr=LR_INIT,
        inner_steps=None,
        objective="online",
        checkpoint_segments=3,
        truncate_steps=5,
    ).double()
    assert module.objective == "online" and module.train_schedule == schedule
    loss, _ = module.meta_loss(batch)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    expected = truncated_reference(model, batch, lr, schedule, kind, 5)
    real = batch.support_mask.sum()
    assert_all_close(grads, [g / real for g in expected[: len(grads)]], what="MAML truncated")


# --------------------------------------------------------------------------- bad configs
#: through the CLI's config (Hydra compose + build_run): the options where they mean
#: nothing, and an invalid value
BAD_CONFIGS = [
    (
        ["algorithm=reptile", "+algorithm.truncate_steps=3"],
        "algorithm.truncate_steps=3 with Reptile: only second-order MAML keeps an unroll "
        "to checkpoint or truncate; allowed: null",
    ),
    (
        ["algorithm=fomaml", "algorithm.checkpoint_segments=auto"],
        "algorithm.checkpoint_segments='auto' with first-order MAML: only second-order MAML "
        "keeps an unroll to checkpoint or truncate; allowed: null",
    ),
    (
        ["engine=higher", "algorithm.checkpoint_segments=auto"],
        "engine=higher does not support algorithm.checkpoint_segments='auto' "
        "(a functional-engine option; use engine=functional, or leave it null)",
    ),
    (
        ["algorithm.checkpoint_segments=0"],
        "algorithm.checkpoint_segments=0; allowed: null, auto, or an integer >= 1",
    ),
    (
        ["engine=higher", "algorithm.truncate_steps=-1"],
        "algorithm.truncate_steps=-1; allowed: null or an integer >= 0",
    ),
]


@pytest.mark.parametrize(
    ("overrides", "message"), BAD_CONFIGS, ids=[" ".join(o) for o, _ in BAD_CONFIGS]
)
def test_bad_long_unroll_configs_are_clear_errors(make_cfg, overrides, message):
    cfg = make_cfg(overrides)
    with pytest.raises(ValueError, match=re.escape(message)):
        build_run(cfg)


SEGMENTS_ALLOWED = "; allowed: null, auto, or an integer >= 1"
TRUNCATE_ALLOWED = "; allowed: null or an integer >= 0"
BAD_VALUES = [
    ({"checkpoint_segments": 0}, "algorithm.checkpoint_segments=0" + SEGMENTS_ALLOWED),
    ({"checkpoint_segments": -2}, "algorithm.checkpoint_segments=-2" + SEGMENTS_ALLOWED),
    ({"checkpoint_segments": "foo"}, "algorithm.checkpoint_segments='foo'" + SEGMENTS_ALLOWED),
    ({"checkpoint_segments": 2.5}, "algorithm.checkpoint_segments=2.5" + SEGMENTS_ALLOWED),
    ({"checkpoint_segments": False}, "algorithm.checkpoint_segments=False" + SEGMENTS_ALLOWED),
    ({"truncate_steps": -1}, "algorithm.truncate_steps=-1" + TRUNCATE_ALLOWED),
    ({"truncate_steps": "foo"}, "algorithm.truncate_steps='foo'" + TRUNCATE_ALLOWED),
    ({"truncate_steps": 1.5}, "algorithm.truncate_steps=1.5" + TRUNCATE_ALLOWED),
]


@pytest.mark.parametrize("engine", ["functional", "higher"])
@pytest.mark.parametrize(("options", "message"), BAD_VALUES, ids=lambda v: repr(v)[:40])
def test_invalid_values_name_the_value(engine, options, message):
    if engine == "higher" and "checkpoint_segments" in options:
        message = "engine=higher does not support algorithm.checkpoint_segments"
    with pytest.raises(ValueError, match=re.escape(message)):
        make_engine(engine, **options)
    with pytest.raises(ValueError, match=re.escape(message)):
        MAML(make_model(), CONTINUOUS, engine={"name": engine}, **options)


@pytest.mark.parametrize(
    "overrides",
    [
        ["algorithm.checkpoint_segments=3", "algorithm.truncate_steps=2"],
        ["engine=higher", "algorithm.truncate_steps=0"],
    ],
    ids=" ".join,
)
def test_good_long_unroll_options_build(make_cfg, overrides):
    cfg = make_cfg(["task=digits", "model=lstm_block", *overrides])
    _, module = build_run(cfg)
    algo = cfg.algorithm
    assert module.engine.name == cfg.engine.name
    assert module.engine.truncate_steps == algo.truncate_steps
    if cfg.engine.name == "functional":
        assert module.engine.checkpoint_segments == algo.checkpoint_segments
