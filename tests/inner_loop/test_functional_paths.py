"""Float64 parity of the functional engine's fast paths (``analytic``, ``autograd``,
``vmap``) with its generic ``vmap_grad`` path (``torch.func.grad`` inside ``vmap``):
losses, adapted parameters and meta-gradients, for every built-in body, the three
losses, learned rates, padding, chunking, checkpointing and truncation; plus which path
``auto`` picks and the errors of a forced path the model cannot take."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import (
    CLASSES,
    CONTINUOUS,
    ONLINE_1,
    ONLINE_2,
    PADDED_LENGTHS,
    QUERY_SCHEDULE,
    assert_all_close,
    make_batch,
    make_lr,
    make_model,
    meta_grads,
    run_objective,
)
from torch import nn

from reptile_gen.data.task_batch import TaskBatch
from reptile_gen.data.task_spec import TaskSpec
from reptile_gen.inner_loop import FunctionalEngine
from reptile_gen.inner_loop.core import InnerSchedule
from reptile_gen.inner_loop.core.losses import closed_form_loss
from reptile_gen.models import MLP, GatedMLP, LSTMBlockStack, Siren

BITS = TaskSpec("discrete", "bits", input_sizes=(4, 3))
REFERENCE = FunctionalEngine(path="vmap_grad")
SCHEDULES = {"query3": QUERY_SCHEDULE, "online1": ONLINE_1, "online2": ONLINE_2}

BODIES = {
    "mlp_relu": (functools.partial(MLP, hidden_sizes=[6, 5], activation="relu"), "analytic"),
    "mlp_gelu": (functools.partial(MLP, hidden_sizes=[6], activation="gelu"), "analytic"),
    "mlp_silu": (functools.partial(MLP, hidden_sizes=[6], activation="silu"), "analytic"),
    "siren": (functools.partial(Siren, hidden_sizes=[5, 5]), "analytic"),
    "gated_mlp": (functools.partial(GatedMLP, hidden_sizes=[5]), "autograd"),
    "lstm_block_input_ln": (
        functools.partial(LSTMBlockStack, hidden_sizes=[4], input_layer=3, layer_norm=True),
        "autograd",
    ),
}


def _close(a, b, what, rtol=1e-10, atol=1e-12):
    for field in ("step_losses", "element_losses", "query_losses"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None), field
        if x is not None:
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=f"{what}: {field}")
    if b.adapted is not None:
        for name in b.adapted:
            torch.testing.assert_close(
                a.adapted[name], b.adapted[name], rtol=rtol, atol=atol, msg=f"{what}: {name}"
            )


def _check(engine, model, batch, lr, spec, kinds, tol=None):
    """Same losses/adapted weights (no graph) and same meta-gradients (second and first
    order) as the reference path."""
    tol = tol or {}
    kw = {"track_query": batch.has_query, "return_adapted": True}
    for name, sched in SCHEDULES.items():
        with torch.enable_grad():
            a = engine.run(model, batch, spec.elementwise_loss, lr, sched, "none", **kw)
            b = REFERENCE.run(model, batch, spec.elementwise_loss, lr, sched, "none", **kw)
        _close(a, b, f"{name} none", **tol)
        for kind in kinds:
            for grad_mode in ("second_order", "first_order"):
                va, ga = meta_grads(engine, model, batch, lr, sched, kind, grad_mode, spec)
                vb, gb = meta_grads(REFERENCE, model, batch, lr, sched, kind, grad_mode, spec)
                torch.testing.assert_close(va, vb, rtol=1e-10, atol=1e-12)
                assert_all_close(ga, gb, what=f"{name} {kind} {grad_mode}", **tol)


@pytest.mark.parametrize("body", list(BODIES))
def test_fast_paths_match_vmap_grad_on_every_body(body):
    make_body, expected = BODIES[body]
    model = make_model(body=make_body)
    assert FunctionalEngine().resolve_path(model)[0] == expected
    batch = make_batch(lengths=PADDED_LENGTHS)
    lr = make_lr(model, "per_tensor", init=0.005 if body == "siren" else 0.05)
    tol = {"rtol": 1e-9, "atol": 1e-9} if body == "siren" else {}
    # the vmap forward is the same for every body: two of them suffice
    paths = ("auto", "vmap") if body in ("mlp_relu", "lstm_block_input_ln") else ("auto",)
    for path in paths:
        _check(FunctionalEngine(path=path), model, batch, lr, CONTINUOUS, ("query", "online"), tol)


@pytest.mark.parametrize("learned", ["none", "scalar", "per_parameter"])
def test_analytic_path_with_learned_rates(learned):
    model = make_model()
    batch = make_batch(lengths=PADDED_LENGTHS)
    lr = make_lr(model, learned)
    _check(FunctionalEngine(path="analytic"), model, batch, lr, CONTINUOUS, ("query",))


def test_closed_form_losses_match_autograd():
    g = torch.Generator().manual_seed(0)
    for spec, target in (
        (TaskSpec("continuous", "real", output_dim=3), torch.randn(4, 5, 3, generator=g)),
        (CLASSES, torch.randint(0, 5, (4, 5), generator=g)),
        (BITS, torch.randint(0, 2, (4, 5), generator=g).double()),
    ):
        pred = torch.randn(4, 5, spec.head_features, generator=g, dtype=torch.float64)
        pred.requires_grad_()
        target = target.double() if target.is_floating_point() else target
        elements, grad = closed_form_loss(spec.elementwise_loss)(pred, target)
        expected = spec.elementwise_loss(pred, target)
        torch.testing.assert_close(elements, expected, rtol=1e-12, atol=1e-14)
        (auto,) = torch.autograd.grad(expected.sum(), pred)
        torch.testing.assert_close(grad, auto, rtol=1e-12, atol=1e-14)
    assert closed_form_loss(lambda p, y: (p - y).abs().mean(-1)) is None


def test_unknown_loss_takes_autograd_gradient():
    """A loss without a closed form still runs the analytic path (its gradient w.r.t.
    the prediction from autograd)."""
    model = make_model()
    batch = make_batch(lengths=PADDED_LENGTHS)
    lr = make_lr(model)

    def loss(pred, target):
        return torch.nn.functional.smooth_l1_loss(pred, target, reduction="none").sum(-1)

    spec = type("Spec", (), {"elementwise_loss": staticmethod(loss)})
    for grad_mode in ("second_order", "first_order"):
        _, ga = meta_grads(
            FunctionalEngine(), model, batch, lr, ONLINE_2, "online", grad_mode, spec
        )
        _, gb = meta_grads(REFERENCE, model, batch, lr, ONLINE_2, "online", grad_mode, spec)
        assert_all_close(ga, gb, what=grad_mode)


def test_checkpointing_truncation_and_chunks_on_the_analytic_path():
    model = make_model()
    batch = make_batch(num_tasks=5, support=7, lengths=[7, 3, 6, 7, 5])
    lr = make_lr(model, "per_parameter")
    for options in (
        {"checkpoint_segments": 3},
        {"truncate_steps": 2},
        {"chunk_size": 2},
        {"checkpoint_segments": "auto", "chunk_size": 3},
    ):
        for kind in ("query", "online"):
            engine = FunctionalEngine(path="analytic", **options)
            reference = FunctionalEngine(path="vmap_grad", **options)
            va, ga = meta_grads(engine, model, batch, lr, ONLINE_1, kind, "second_order")
            vb, gb = meta_grads(reference, model, batch, lr, ONLINE_1, kind, "second_order")
            torch.testing.assert_close(va, vb, rtol=1e-10, atol=1e-12)
            assert_all_close(ga, gb, what=f"{options} {kind}")


class _Scaled(nn.Module):
    """A module the batched forward does not know (the ``vmap`` path runs it)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(1, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)) * 2.0)


def test_auto_picks_vmap_for_unknown_modules_and_forced_paths_are_clear_errors():
    torch.manual_seed(0)
    model = _Scaled().double()
    assert FunctionalEngine().resolve_path(model) == ("vmap", None)
    batch = make_batch(lengths=PADDED_LENGTHS)
    lr = make_lr(model)
    _check(FunctionalEngine(), model, batch, lr, CONTINUOUS, ("query",))
    with pytest.raises(ValueError, match="path='analytic'.*allowed for it: auto, vmap"):
        FunctionalEngine(path="analytic").run(
            model, batch, CONTINUOUS.elementwise_loss, lr, QUERY_SCHEDULE, "none"
        )
    lstm = make_model(body=BODIES["lstm_block_input_ln"][0])
    with pytest.raises(ValueError, match="no hand-written backward.*auto, autograd"):
        FunctionalEngine(path="analytic").resolve_path(lstm)
    with pytest.raises(ValueError, match="path='fast'; allowed: auto, analytic"):
        FunctionalEngine(path="fast")


def test_compiled_model_follows_a_swapped_activation():
    """The compiled form is cached per model; replacing a submodule recompiles it."""
    model = make_model(body=BODIES["mlp_relu"][0])
    batch = make_batch()
    lr = make_lr(model)
    engine = FunctionalEngine()
    assert engine.resolve_path(model)[0] == "analytic"
    model.body.net[1] = nn.Tanh()
    _check(engine, model, batch, lr, CONTINUOUS, ("query",))


# ------------------------------------------------------------------ hand-written reverse pass
HAND_BODIES = {
    "mlp_relu": BODIES["mlp_relu"][0],
    "mlp_tanh": functools.partial(MLP, hidden_sizes=[6, 5], activation="tanh"),
    "siren": BODIES["siren"][0],
    "mlp_gelu": BODIES["mlp_gelu"][0],
    "mlp_silu": BODIES["mlp_silu"][0],
    "mlp_gelu_tanh": None,  # GELU(approximate="tanh") swapped in below
}


def _hand_calls(monkeypatch):
    """Counts of the hand-written backward passes taken (segment, query)."""
    from reptile_gen.inner_loop.functional import second_order

    calls = {"segment": 0, "query": 0}
    for name, cls in (("segment", second_order.HandSegment), ("query", second_order.HandQuery)):
        original = cls.backward

        def counted(ctx, *grads, _original=original, _name=name):
            calls[_name] += 1
            return _original(ctx, *grads)

        monkeypatch.setattr(cls, "backward", staticmethod(counted))
    return calls


@pytest.mark.parametrize("learned", ["none", "scalar", "per_tensor", "per_parameter"])
@pytest.mark.parametrize("body", list(HAND_BODIES))
def test_hand_backward_equals_the_autograd_graph(body, learned, monkeypatch):
    """The hand-written reverse pass (R-operator Hessian-vector products, learned-rate
    gradients, first-order steps) gives the autograd graph's meta-gradients in float64,
    for second-order, first-order and truncated MAML on the query and online objectives,
    with padding."""
    calls = _hand_calls(monkeypatch)
    model = make_model(body=HAND_BODIES[body] or BODIES["mlp_gelu"][0])
    if body == "mlp_gelu_tanh":
        model.body.net[1] = nn.GELU(approximate="tanh")
    batch = make_batch(lengths=PADDED_LENGTHS)
    lr = make_lr(model, learned, init=0.005 if body == "siren" else 0.05)
    hand, graph = FunctionalEngine(path="analytic"), FunctionalEngine(hand_backward=False)
    cases = [(s, k, m) for s in SCHEDULES.values() for k in ("query", "online")
             for m in ("second_order", "first_order")]  # fmt: skip
    for sched, kind, mode in cases:
        va, ga = meta_grads(hand, model, batch, lr, sched, kind, mode)
        vb, gb = meta_grads(graph, model, batch, lr, sched, kind, mode)
        torch.testing.assert_close(va, vb, rtol=1e-12, atol=1e-13)
        assert_all_close(ga, gb, rtol=1e-9, atol=1e-11, what=f"{body} {kind} {mode}")
    truncated = FunctionalEngine(truncate_steps=1)
    va, ga = meta_grads(truncated, model, batch, lr, ONLINE_1, "online", "second_order")
    vb, gb = meta_grads(
        FunctionalEngine(truncate_steps=1, hand_backward=False), model, batch, lr, ONLINE_1,
        "online", "second_order",
    )  # fmt: skip
    assert_all_close(ga, gb, rtol=1e-9, atol=1e-11, what=f"{body} truncated")
    assert calls["segment"] > 0 and calls["query"] > 0


@pytest.mark.parametrize("spec", [CLASSES, BITS], ids=["classes", "bits"])
def test_hand_backward_with_embeddings_cross_entropy_and_bits(spec, monkeypatch):
    """Embedding tables (row tangents, scatter-add R-backward) and the curvature of the
    cross-entropy and Bernoulli losses, against the generic ``vmap_grad`` path."""
    calls = _hand_calls(monkeypatch)
    model = make_model(spec, body=functools.partial(MLP, hidden_sizes=[6], activation="tanh"))
    batch = make_batch(spec, num_tasks=3, support=5, query=None, lengths=[5, 2, 4])
    if spec is BITS:
        g = torch.Generator().manual_seed(5)
        x = torch.stack([torch.randint(0, n, (3, 5), generator=g) for n in BITS.input_sizes], -1)
        batch = TaskBatch(x, torch.randint(0, 2, (3, 5), generator=g).double(), batch.support_mask)
    lr = make_lr(model, "per_tensor")
    for sched in (ONLINE_1, ONLINE_2):
        va, ga = meta_grads(
            FunctionalEngine(), model, batch, lr, sched, "online", "second_order", spec
        )
        vb, gb = meta_grads(REFERENCE, model, batch, lr, sched, "online", "second_order", spec)
        torch.testing.assert_close(va, vb, rtol=1e-12, atol=1e-13)
        assert_all_close(ga, gb, what=f"{spec.output_kind}")
    assert calls["segment"] > 0


def test_hand_backward_matches_finite_differences():
    """A directional derivative of second-order MAML's query objective (two inner steps,
    learned per-tensor rates) through the hand-written pass, against central differences."""
    from helpers import directional_fd

    model = make_model(body=HAND_BODIES["mlp_tanh"])
    batch = make_batch(lengths=PADDED_LENGTHS)
    lr = make_lr(model, "per_tensor", init=0.05)
    engine = FunctionalEngine()
    sched = InnerSchedule(num_steps=2)
    params = list(model.parameters()) + list(lr.parameters())
    g = torch.Generator().manual_seed(3)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    _, grads = meta_grads(engine, model, batch, lr, sched, "query", "second_order")
    analytic = sum(float((a * d).sum()) for a, d in zip(grads, direction))

    def value():
        with torch.no_grad(), torch.enable_grad():
            return run_objective(engine, model, batch, lr, sched, "query", "none")

    numeric = directional_fd(value, params, direction)
    assert abs(analytic - numeric) <= 1e-7 * max(1.0, abs(numeric)), (analytic, numeric)


def test_hand_backward_coverage_and_double_backward_error(monkeypatch):
    """A loss without a closed-form curvature keeps the autograd graph. The hand pass is
    not differentiable: create_graph=True through it is a clear error."""
    calls = _hand_calls(monkeypatch)
    batch = make_batch()
    model = make_model()

    def loss(pred, target):
        return torch.nn.functional.smooth_l1_loss(pred, target, reduction="none").sum(-1)

    spec = type("Spec", (), {"elementwise_loss": staticmethod(loss)})
    meta_grads(
        FunctionalEngine(),
        model,
        batch,
        make_lr(model),
        QUERY_SCHEDULE,
        "query",
        "second_order",
        spec,
    )
    assert calls == {"segment": 0, "query": 0}
    model = make_model()
    loss = run_objective(
        FunctionalEngine(), model, batch, make_lr(model), QUERY_SCHEDULE, "query", "second_order"
    )
    torch.autograd.grad(loss, [model.head.weight])
    assert calls == {"segment": 1, "query": 1}
    loss = run_objective(
        FunctionalEngine(), model, batch, make_lr(model), QUERY_SCHEDULE, "query", "second_order"
    )
    with pytest.raises(RuntimeError, match="not differentiable.*hand_backward=False"):
        torch.autograd.grad(loss, [model.head.weight], create_graph=True)


def test_trailing_padding_steps_are_skipped_exactly():
    """Steps past the longest sequence of a batch see only padding: the engine skips
    them, with the same losses (zeros for the skipped steps), element losses and
    meta-gradients as running them, truncation and checkpointing included."""
    model = make_model(body=HAND_BODIES["mlp_tanh"])
    batch = make_batch(num_tasks=3, support=5, query=4, lengths=[5, 3, 4])
    pad = torch.zeros(3, 4, dtype=batch.support_x.dtype)
    padded = TaskBatch(
        torch.cat(
            [batch.support_x, pad.unsqueeze(-1).expand(-1, -1, batch.support_x.shape[-1])], 1
        ),
        torch.cat(
            [batch.support_y, pad.unsqueeze(-1).expand(-1, -1, batch.support_y.shape[-1])], 1
        ),
        torch.cat([batch.support_mask, torch.zeros(3, 4, dtype=torch.bool)], 1),
        batch.query_x,
        batch.query_y,
    )
    lr = make_lr(model, "per_tensor")
    options = ({}, {"truncate_steps": 5}, {"checkpoint_segments": 2}, {"path": "vmap_grad"})
    kw = {"track_query": True, "return_adapted": True}

    def everything(engine):
        with torch.enable_grad():
            plain = engine.run(
                model, padded, CONTINUOUS.elementwise_loss, lr, ONLINE_1, "none", **kw
            )
        grads = [
            meta_grads(engine, model, padded, lr, ONLINE_1, kind, mode)
            for kind in ("query", "online")
            for mode in ("second_order", "first_order")
        ]
        return plain, grads

    for option in options:
        skipped = everything(FunctionalEngine(**option))
        full = everything(FunctionalEngine(**option, skip_idle_steps=False))
        _close(skipped[0], full[0], "no graph", rtol=1e-12, atol=1e-14)
        assert skipped[0].step_losses.shape == (3, 9)
        assert not skipped[0].step_losses[:, 5:].any()
        for (va, ga), (vb, gb) in zip(skipped[1], full[1]):
            torch.testing.assert_close(va, vb, rtol=1e-12, atol=1e-14)
            assert_all_close(ga, gb, rtol=1e-10, atol=1e-13)
