"""``algorithm.compile``: the few-shot MAML meta-step as flat programs (:mod:`.compiled`).

Float64 parity with the functional engine's eager path (losses and meta-gradients) for
every activation, the three closed-form losses, one and several inner steps, first-order
and truncated steps, padded support sets and any adjoints of the three outputs (the query
losses alone: the fused program; step and element losses too: the general reverse). The
programs run op by op here (``compile="eager"``) except in one test that builds them with
``torch.compile`` for real, plus the errors for what the programs do not cover.
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import (
    CLASSES,
    CONTINUOUS,
    PADDED_LENGTHS,
    assert_all_close,
    make_batch,
    make_lr,
    make_model,
    wrt,
)

from reptile_gen.data.task_spec import TaskSpec
from reptile_gen.inner_loop import FunctionalEngine, InnerSchedule, make_engine
from reptile_gen.inner_loop.functional import compiled as compiled_module
from reptile_gen.models import MLP, GatedMLP

SPECS = {
    "mse": CONTINUOUS,
    "mse_2d": TaskSpec("continuous", "real", input_dim=3, output_dim=2),
    "cross_entropy": TaskSpec("continuous", "classes", input_dim=2, output_dim=4),
    "bce": TaskSpec("continuous", "bits", input_dim=2, output_dim=3),
}
#: (inner steps, grad mode, truncate_steps)
MODES = [
    (1, "second_order", None),
    (3, "second_order", None),
    (3, "second_order", 1),
    (2, "first_order", None),
]


def _outputs(engine, model, batch, lr, steps, grad_mode, spec, adjoints):
    """Losses and the gradient of ``sum(adjoint * output)`` over the four outputs: the
    task-mean final query loss (MAML's objective), the query, step and element losses
    (an adjoint of None leaves that output out of the objective)."""
    result = engine.run(
        model, batch, spec.elementwise_loss, lr, InnerSchedule(num_steps=steps), grad_mode
    )
    outs = (
        result.query_objective(),
        result.query_losses,
        result.step_losses,
        result.element_losses,
    )
    value = sum((a * o).sum() for a, o in zip(adjoints, outs) if a is not None)
    grads = torch.autograd.grad(value, wrt(model, lr))
    return [o.detach() for o in outs], grads


#: which outputs carry an adjoint: the objective alone (MAML's training step), the query
#: losses, both, or every output (the general reverse)
WHICH = ("objective", "query", "objective+query", "all")


def _adjoints(batch, steps, which):
    g = torch.Generator().manual_seed(7)
    b, k = batch.support_mask.shape

    def draw(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64) + 0.5

    objective, query, step, element = draw(()), draw(b, 1), draw(b, steps), draw(b, k)
    if which == "objective":
        return objective, None, None, None
    if which == "query":
        return None, query, None, None
    if which == "objective+query":
        return objective, query, None, None
    return objective, query, step, element


def _check_every_mode(activation, loss, learned="none"):
    """The program (run op by op) against the eager engine: every mode of :data:`MODES`,
    every adjoint combination of :data:`WHICH`, on a padded batch."""
    spec = SPECS[loss]
    body = functools.partial(MLP, hidden_sizes=[6, 5], activation=activation)
    model = make_model(spec, body=body)
    batch = make_batch(spec, lengths=PADDED_LENGTHS)
    lr = make_lr(model, learned, init=0.1)
    for steps, grad_mode, truncate in MODES:
        eager = FunctionalEngine(truncate_steps=truncate)
        program = FunctionalEngine(truncate_steps=truncate, compile="eager")
        for which in WHICH:
            adjoints = _adjoints(batch, steps, which)
            what = f"{learned} {activation} {loss} {steps} {grad_mode} {truncate} {which}"
            a = _outputs(program, model, batch, lr, steps, grad_mode, spec, adjoints)
            b = _outputs(eager, model, batch, lr, steps, grad_mode, spec, adjoints)
            assert_all_close(a[0] + list(a[1]), b[0] + list(b[1]), what=what)


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu", "silu"])
@pytest.mark.parametrize("loss", list(SPECS))
def test_programs_match_the_eager_engine(activation, loss):
    _check_every_mode(activation, loss)


@pytest.mark.parametrize("learned", ["scalar", "per_tensor", "per_parameter", "per_unit"])
def test_learned_inner_rates(learned):
    """Meta-SGD: the rates' meta-gradients too, second and first order (the rates still
    learn under first-order MAML), every combination of adjoints."""
    for activation, loss in (("tanh", "mse"), ("relu", "cross_entropy")):
        _check_every_mode(activation, loss, learned)


def test_one_hidden_layer_and_three_hidden_layers():
    for sizes in ([7], [6, 5, 4]):
        model = make_model(body=functools.partial(MLP, hidden_sizes=sizes, activation="tanh"))
        batch = make_batch()
        lr = make_lr(model)
        adjoints = _adjoints(batch, 2, "all")
        a = _outputs(FunctionalEngine(compile="eager"), model, batch, lr, 2, "second_order",
                     CONTINUOUS, adjoints)  # fmt: skip
        b = _outputs(FunctionalEngine(), model, batch, lr, 2, "second_order", CONTINUOUS, adjoints)
        assert_all_close(a[0] + list(a[1]), b[0] + list(b[1]), what=str(sizes))


def test_compiled_programs_match_the_eager_engine():
    """torch.compile for real (Inductor, C++): the fused program (query objective) and
    the general reverse (step losses in the objective) on a float64 relu MLP with a
    learned scalar inner rate."""
    model = make_model(body=functools.partial(MLP, hidden_sizes=[6, 5], activation="relu"))
    batch = make_batch(lengths=PADDED_LENGTHS)
    lr = make_lr(model, "scalar", init=0.1)
    for which in WHICH:
        adjoints = _adjoints(batch, 2, which)
        a = _outputs(FunctionalEngine(compile=True), model, batch, lr, 2, "second_order",
                     CONTINUOUS, adjoints)  # fmt: skip
        b = _outputs(FunctionalEngine(), model, batch, lr, 2, "second_order", CONTINUOUS, adjoints)
        assert_all_close(a[0] + list(a[1]), b[0] + list(b[1]), what=which)
    built = [p for key, ps in compiled_module.built_programs().items() if key[-1] for p in ps[:2]]
    assert built and all(p.ok for p in built)  # compiled and ran, no fallback


def test_evaluation_runs_the_eager_path(monkeypatch):
    """No meta-gradient (grad_mode none, tracked query losses): the engine's eager path."""
    calls = []
    real = compiled_module.run_compiled
    monkeypatch.setattr(
        compiled_module, "run_compiled", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    model = make_model()
    batch = make_batch()
    lr = make_lr(model)
    engine = FunctionalEngine(compile="eager")
    with torch.enable_grad():
        result = engine.run(model, batch, CONTINUOUS.elementwise_loss, lr,
                            InnerSchedule(num_steps=2), "none", track_query=True)  # fmt: skip
    assert calls == [] and result.query_losses.shape == (3, 3)
    engine.run(model, batch, CONTINUOUS.elementwise_loss, lr, InnerSchedule(num_steps=2),
               "second_order")  # fmt: skip
    assert calls == [1]


def test_what_the_programs_do_not_cover_is_a_clear_error():
    batch = make_batch()
    sched = InnerSchedule(num_steps=1)

    def run(model, engine=None, lr=None, spec=CONTINUOUS, batch=batch):
        engine = engine or FunctionalEngine(compile="eager")
        lr = lr or make_lr(model)
        return engine.run(model, batch, spec.elementwise_loss, lr, sched, "second_order")

    with pytest.raises(ValueError, match="compile=true: the body is a GatedMLP.*compile=false"):
        run(make_model(body=functools.partial(GatedMLP, hidden_sizes=[4])))
    with pytest.raises(ValueError, match="input encoder is a DiscreteEncoder"):
        run(make_model(CLASSES), spec=CLASSES, batch=make_batch(CLASSES))
    model = make_model()
    with pytest.raises(ValueError, match="checkpoint_segments='auto'.*checkpoint_segments=null"):
        run(model, engine=FunctionalEngine(compile="eager", checkpoint_segments="auto"))
    with pytest.raises(ValueError, match="compile='fast'; allowed: false, true, eager"):
        FunctionalEngine(compile="fast")
    with pytest.raises(ValueError, match="does not combine with path='vmap'"):
        FunctionalEngine(compile=True, path="vmap")
    with pytest.raises(ValueError, match="compile=True with engine=lowrank"):
        make_engine("lowrank", compile=True)
    # the backward is written out, not differentiable
    for result in (run(model), run(model)):
        for loss in (result.query_objective(), result.final_query_loss.sum()):
            with pytest.raises(RuntimeError, match="not differentiable.*compile=false"):
                torch.autograd.grad(loss, [model.head.weight], create_graph=True)


def test_a_failed_compile_is_a_clear_error(monkeypatch):
    """No C++ compiler (say): the first call's Inductor failure becomes an error that
    says what is needed and which settings avoid it."""

    def broken(*args, **kwargs):
        raise OSError("g++: command not found")

    compiled_module.clear_programs()
    monkeypatch.setattr(compiled_module.torch, "compile", lambda fn, **kw: broken)
    model = make_model()
    with pytest.raises(RuntimeError, match=r"needs g\+\+.*compile=eager.*OSError: g\+\+: command"):
        FunctionalEngine(compile=True).run(
            model, make_batch(), CONTINUOUS.elementwise_loss, make_lr(model),
            InnerSchedule(num_steps=1), "second_order",
        )  # fmt: skip


def test_a_replaced_layer_or_activation_is_seen():
    """The plan holds the model's layers: replacing one (or an activation) replans."""
    model = make_model(body=functools.partial(MLP, hidden_sizes=[6, 5], activation="tanh"))
    batch = make_batch()
    lr = make_lr(model)
    adjoints = _adjoints(batch, 1, "objective")

    def both():
        a = _outputs(FunctionalEngine(compile="eager"), model, batch, lr, 1, "second_order",
                     CONTINUOUS, adjoints)  # fmt: skip
        b = _outputs(FunctionalEngine(), model, batch, lr, 1, "second_order", CONTINUOUS, adjoints)
        assert_all_close(a[0] + list(a[1]), b[0] + list(b[1]))

    both()
    torch.manual_seed(3)
    model.head = torch.nn.Linear(5, 1).double()
    model.body.net[1] = torch.nn.ReLU()
    both()
