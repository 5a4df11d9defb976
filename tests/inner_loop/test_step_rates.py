"""Inner rates that change along the inner loop, in float64: fixed schedules equal a
hand-computed rate sequence on every engine that runs them; per-step learned rates
(``per_step``, ``per_layer_per_step``), and per-unit rates (alone and on a schedule), get
the generic path's meta-gradients on every engine and mode (the low-rank engine with its history read as rows and folded), and the
exact ones match finite differences; the compiled program refuses them clearly."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from helpers import (
    CLASSES,
    CONTINUOUS,
    ONLINE_2,
    PARITY_ENGINES,
    QUERY_SCHEDULE,
    assert_all_close,
    directional_fd,
    jitter_rates,
    make_batch,
    make_model,
    meta_grads,
    run_objective,
)

from reptile_gen.inner_loop import FunctionalEngine, InnerLR, make_engine
from reptile_gen.inner_loop.core import InnerSchedule
from reptile_gen.inner_loop.core.rates import schedule_factors
from reptile_gen.models import GatedMLP, LSTMBlockStack

LENGTHS = [6, 3, 5]

#: objective -> (schedule, query elements): 3 inner steps each (the rates' horizon)
OBJECTIVES = {"online": (ONLINE_2, None), "query": (QUERY_SCHEDULE, 4)}

#: mode -> (grad_mode, engine options)
MODES = {
    "first_order": ("first_order", {}),
    "second_order": ("second_order", {}),
    "checkpointed": ("second_order", {"checkpoint_segments": 2}),
    "truncated": ("second_order", {"truncate_steps": 1}),
}

ENGINES = {
    **PARITY_ENGINES,
    "lowrank_fold_always": lambda **o: make_engine("lowrank", fold="always", **o),
    "lowrank_fold_never": lambda **o: make_engine("lowrank", fold="never", **o),
}


def make_rates(model, learned, schedule="constant", buckets=None, horizon=3, seed=3):
    """Rates of ``model``'s tensors; learned ones jittered so that every entry differs."""
    shapes = [(n, p.shape) for n, p in model.named_parameters()]
    lr = InnerLR(shapes, 0.08, learned, schedule, 0.4, buckets, horizon).double()
    return jitter_rates(lr, seed)


# ------------------------------------------------------------------------ fixed schedules
def test_named_schedules_are_the_documented_formulas():
    h, e = 5, 0.2
    u = [i / (h - 1) for i in range(h)]
    expected = {
        "constant": [1.0] * h,
        "linear": [1 + (e - 1) * x for x in u],
        "cosine": [e + (1 - e) * (1 + math.cos(math.pi * x)) / 2 for x in u],
        "exp": [e**x for x in u],
        (1.0, 0.5): [1.0, 1.0, 1.0, 0.5, 0.5],  # two buckets of five steps: 0-2, 3-4
    }
    for schedule, want in expected.items():
        assert schedule_factors(schedule, e, h) == pytest.approx(want, rel=1e-15)
    # steps past the horizon (longer evaluation) keep the last step's rate
    lr = InnerLR([("w", (2,))], 0.1, schedule="linear", end_factor=e, horizon=h)
    assert lr.step_rates(7).factors == pytest.approx([*expected["linear"], e, e], rel=1e-15)
    # without a horizon, each run spans its own steps
    free = InnerLR([("w", (2,))], 0.1, schedule="exp", end_factor=e)
    assert free.step_rates(5).factors == pytest.approx(expected["exp"], rel=1e-15)


def hand_sgd(model, batch, spec, rates, schedule):
    """Each task's inner SGD by hand (autograd per task), the rate of step ``i`` being
    ``rates[i]``; returns the adapted parameters ``{name: [B, ...]}``."""
    slices = schedule.slices(batch.support_x.shape[1])
    out = []
    for b in range(batch.num_tasks):
        net = copy.deepcopy(model)
        for i, (start, end) in enumerate(slices):
            m = batch.support_mask[b, start:end]
            if not bool(m.any()):
                continue
            x, y = batch.support_x[b, start:end][m], batch.support_y[b, start:end][m]
            loss = spec.elementwise_loss(net(x), y).mean()
            grads = torch.autograd.grad(loss, list(net.parameters()))
            with torch.no_grad():
                for p, g in zip(net.parameters(), grads):
                    p.sub_(rates[i] * g)
        out.append({n: p.detach() for n, p in net.named_parameters()})
    return {n: torch.stack([o[n] for o in out]) for n in out[0]}


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("schedule", ["linear", "cosine", "exp", (1.0, 0.25, 2.0)])
def test_a_fixed_schedule_is_the_hand_computed_rate_sequence(engine, schedule):
    spec = CLASSES
    model = make_model(spec)
    batch = make_batch(spec, num_tasks=3, support=6, query=None, lengths=LENGTHS)
    horizon = 6  # one element per step
    lr = InnerLR([(n, p.shape) for n, p in model.named_parameters()], 0.3, "none", schedule, 0.1)
    lr = lr.double()
    online = InnerSchedule(num_steps=None, inner_batch_size=1)
    hand = [0.3 * f for f in schedule_factors(schedule, 0.1, horizon)]
    want = hand_sgd(model, batch, spec, hand, online)
    got = ENGINES[engine]().run(
        model, batch, spec.elementwise_loss, lr, online, "none", return_adapted=True
    )
    assert_all_close(list(got.adapted.values()), list(want.values()), what=engine)
    assert not lr.step_rates(horizon).constant


# ------------------------------------------------------------------- learned per-step rates
@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize(
    "rates",
    [
        ("per_step", "constant", None),
        ("per_layer_per_step", "constant", 2),
        ("per_layer_per_step", "cosine", None),
        ("per_tensor", "linear", None),
        ("per_unit", "constant", None),
        ("per_unit", "cosine", None),
    ],
)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("engine", list(ENGINES))
def test_per_step_rates_get_the_generic_paths_meta_gradient(engine, mode, rates, objective):
    if (engine, mode) == ("higher", "checkpointed"):
        pytest.skip("higher has no checkpointing")
    grad_mode, options = MODES[mode]
    learned, schedule_name, buckets = rates
    schedule, query = OBJECTIVES[objective]
    spec = CONTINUOUS
    model = make_model(spec)
    batch = make_batch(spec, num_tasks=3, support=6, query=query, lengths=LENGTHS)
    lr = make_rates(model, learned, schedule_name, buckets)
    ours = ENGINES[engine](**options)
    reference = FunctionalEngine(path="vmap_grad", truncate_steps=options.get("truncate_steps"))
    va, ga = meta_grads(ours, model, batch, lr, schedule, objective, grad_mode, spec)
    vb, gb = meta_grads(reference, model, batch, lr, schedule, objective, grad_mode, spec)
    tol = {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(va, vb, **tol)
    assert_all_close(ga, gb, what=f"{engine} {mode} {rates} {objective}", **tol)
    rate_grads = ga[len(list(model.parameters())) :]
    # every learned rate gets a gradient, in every mode (a rate scales its step's update,
    # which later losses see even with the inner gradients held constant), except the
    # online objective's last step: no later loss sees its update
    for g in rate_grads:
        entries = g.reshape(-1, *g.shape[1:]) if g.dim() else g.reshape(1)
        if objective == "online" and lr.learned in ("per_step", "per_layer_per_step"):
            buckets = lr.step_rates(3).buckets
            if buckets.count(buckets[-1]) == 1:  # the last bucket holds the last step only
                assert float(entries[-1].abs().sum()) == 0.0
                entries = entries[:-1]
        assert bool((entries.reshape(len(entries), -1).abs().sum(1) > 0).all()), g
    if mode in ("second_order", "checkpointed") and engine != "higher":
        # exact: against central finite differences, on the rates alone and on everything
        params = list(model.parameters()) + list(lr.parameters())
        gen = torch.Generator().manual_seed(11)
        for only_rates in (True, False):
            direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
            if only_rates:
                direction = [
                    d if k >= len(list(model.parameters())) else torch.zeros_like(d)
                    for k, d in enumerate(direction)
                ]

            def value():
                return run_objective(reference, model, batch, lr, schedule, objective, "none")

            fd = directional_fd(value, params, direction)
            exact = float(sum((g * d).sum() for g, d in zip(ga, direction)))
            assert abs(exact - fd) <= 1e-6 * max(1.0, abs(fd)), (only_rates, exact, fd)


LOWRANK_FOLDS = ["auto", "always", "never"]


@pytest.mark.parametrize("fold", LOWRANK_FOLDS)
@pytest.mark.parametrize("spec", [CONTINUOUS, CLASSES], ids=["continuous", "classes"])
@pytest.mark.parametrize(
    "rates",
    [
        ("none", "exp", None),
        ("per_tensor", (1.0, 0.25, 2.0), None),
        ("per_step", "cosine", 2),
        ("per_unit", "linear", None),
    ],
)
def test_lowrank_runs_changing_rates_without_a_graph_as_the_functional_engine(rates, spec, fold):
    """Reptile's and evaluation's runs (no graph) on padded tasks: every loss (the query
    loss tracked after each step), the adapted weights and their task-mean (Reptile's
    target) are the functional engine's; the embedding encoder keeps an index history."""
    learned, schedule_name, buckets = rates
    model = make_model(spec)
    batch = make_batch(spec, num_tasks=3, support=6, query=4, lengths=LENGTHS)
    lr = make_rates(model, learned, schedule_name, buckets)
    lowrank = make_engine("lowrank", fold=fold)
    tol = {"rtol": 1e-10, "atol": 1e-12}
    for schedule in (ONLINE_2, QUERY_SCHEDULE):
        kw = {"track_query": True, "return_adapted": True}
        with torch.enable_grad():
            ref = make_engine("functional").run(
                model, batch, spec.elementwise_loss, lr, schedule, "none", **kw
            )
            ours = lowrank.run(model, batch, spec.elementwise_loss, lr, schedule, "none", **kw)
            mean = lowrank.run(
                model, batch, spec.elementwise_loss, lr, schedule, "none", return_adapted="mean"
            )
        for field in ("step_losses", "element_losses", "query_losses"):
            torch.testing.assert_close(getattr(ours, field), getattr(ref, field), **tol)
        torch.testing.assert_close(mean.query_losses[:, 0], ref.query_losses[:, -1], **tol)
        for name, phi in ref.adapted.items():
            torch.testing.assert_close(ours.adapted[name], phi, **tol, msg=name)
            torch.testing.assert_close(mean.adapted_mean[name], phi.mean(0), **tol, msg=name)


@pytest.mark.parametrize(
    "rates", [("per_layer_per_step", "cosine", 2), ("per_unit", "cosine", None)]
)
@pytest.mark.parametrize("mode", list(MODES))
def test_lowrank_per_step_rates_on_embeddings_get_the_functional_meta_gradient(mode, rates):
    """Embedding tables (index history) with learned per-layer per-step rates (or
    per-unit rates: one per table row) on a cosine schedule, padded tasks, the online
    objective: the functional engine's meta-gradients, with the history read as rows
    and folded."""
    grad_mode, options = MODES[mode]
    spec = CLASSES
    model = make_model(spec)
    batch = make_batch(spec, num_tasks=3, support=6, query=None, lengths=LENGTHS)
    lr = make_rates(model, *rates)
    reference = FunctionalEngine(path="vmap_grad", truncate_steps=options.get("truncate_steps"))
    vb, gb = meta_grads(reference, model, batch, lr, ONLINE_2, "online", grad_mode, spec)
    for fold in LOWRANK_FOLDS:
        ours = make_engine("lowrank", fold=fold, **options)
        va, ga = meta_grads(ours, model, batch, lr, ONLINE_2, "online", grad_mode, spec)
        torch.testing.assert_close(va, vb, rtol=1e-10, atol=1e-12)
        assert_all_close(ga, gb, what=f"{mode} fold={fold}")


BODIES = {
    "gated_mlp": functools.partial(GatedMLP, hidden_sizes=[6, 6]),
    "lstm_block_input_ln": functools.partial(
        LSTMBlockStack, hidden_sizes=[5], input_layer=4, layer_norm=True
    ),
}


@pytest.mark.parametrize("mode", ["first_order", "checkpointed", "truncated"])
@pytest.mark.parametrize("body", list(BODIES))
def test_lowrank_per_step_rates_on_other_bodies(body, mode):
    """Bodies whose other parameters (gates' biases, LayerNorm gains, the LSTM block's
    initial state) stay per-task tensors: they take their step's rate too."""
    grad_mode, options = MODES[mode]
    spec = CONTINUOUS
    model = make_model(spec, BODIES[body])
    batch = make_batch(spec, num_tasks=3, support=6, query=4, lengths=LENGTHS)
    lr = make_rates(model, "per_layer_per_step", "linear", None)
    reference = FunctionalEngine(path="vmap_grad", truncate_steps=options.get("truncate_steps"))
    ours = make_engine("lowrank", **options)
    va, ga = meta_grads(ours, model, batch, lr, QUERY_SCHEDULE, "query", grad_mode, spec)
    vb, gb = meta_grads(reference, model, batch, lr, QUERY_SCHEDULE, "query", grad_mode, spec)
    torch.testing.assert_close(va, vb, rtol=1e-10, atol=1e-12)
    assert_all_close(ga, gb, what=f"{body} {mode}")


def test_evaluation_past_the_horizon_keeps_the_last_rate():
    """Few-shot: 3 training steps; a 5-step evaluation takes the trained rates for its
    first 3 steps and the last one after (the same as a 3-bucket rate list run by hand)."""
    spec = CONTINUOUS
    model = make_model(spec)
    batch = make_batch(spec, num_tasks=2, support=5, query=4)
    lr = make_rates(model, "per_step")
    values = [float(v) for v in lr.steps.detach()]
    five = InnerSchedule(num_steps=5)
    want = hand_sgd(model, batch, spec, [*values, values[-1], values[-1]], five)
    got = make_engine("functional").run(
        model, batch, spec.elementwise_loss, lr, five, "none", return_adapted=True
    )
    assert_all_close(list(got.adapted.values()), list(want.values()))


# ------------------------------------------------------------------------------ refusals
def test_config_errors_name_the_key():
    shapes = [("w", (2,))]
    cases = [
        (dict(learned="per_step"), "inner_lr_buckets=null with inner_lr_learned=per_step"),
        (dict(learned="per_step", buckets=0, horizon=4), "inner_lr_buckets=0; must be"),
        (dict(learned="per_step", buckets=5, horizon=4), "inner_lr_buckets=5: more buckets"),
        (dict(learned="per_tensor", buckets=2), "inner_lr_buckets=2 with inner_lr_learned"),
        (dict(schedule="step"), "inner_lr_schedule='step'; allowed: constant, linear"),
        (dict(schedule=[]), r"inner_lr_schedule=\[\]; allowed"),
        (dict(schedule=[1.0, -1.0]), r"inner_lr_schedule=\[1.0, -1.0\]: the factors"),
        (dict(schedule="exp", end_factor=0.0), r"inner_lr_end_factor=0.0; must be a number > 0"),
        (dict(schedule=[1, 1, 1], horizon=2), "3 factors for the 2 inner steps"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            InnerLR(shapes, 0.1, **kwargs)


@pytest.mark.parametrize(
    "options",
    [
        {"inner_lr_learned": "per_step"},
        {"inner_lr_learned": "per_layer_per_step"},
        {"inner_lr_schedule": "cosine"},
    ],
)
def test_the_compiled_program_refuses_rates_that_change_along_the_loop(options):
    with pytest.raises(ValueError, match=r"engine.compile=True with inner rates that change"):
        make_engine("functional", compile=True, **options)
    make_engine("lowrank", **options)  # the low-rank engine runs them (tests above)
