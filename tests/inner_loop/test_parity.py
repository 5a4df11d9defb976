"""One float64 parity suite: every engine x algorithm mode x model body x output kind.

Each engine (``functional`` on its default path and with autograd's graph instead of the
hand-written reverse pass, ``lowrank``, ``higher``) runs each algorithm mode (Reptile /
evaluation without a graph, first-order, second-order, checkpointed and truncated MAML)
on padded online tasks, and must give the generic ``torch.func`` path's losses, adapted
weights and meta-gradients (initial weights and learned inner rates): engines agree with
each other through it. The exact second-order gradients (plain and checkpointed) are also
checked against a central finite difference along a random direction.
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import (
    CLASSES,
    CONTINUOUS,
    ONLINE_2,
    PARITY_MODES,
    QUERY_SCHEDULE,
    assert_matches_reference,
    make_batch,
    make_lr,
    make_model,
)

from reptile_gen.algorithms import MAML
from reptile_gen.data.task_batch import TaskBatch
from reptile_gen.data.task_spec import TaskSpec
from reptile_gen.inner_loop import FunctionalEngine, make_engine
from reptile_gen.inner_loop.core.losses import LOSSES, closed_form_loss, loss_kind
from reptile_gen.models import MLP, GatedMLP, LSTMBlockStack, Siren

BITS = TaskSpec("discrete", "bits", input_sizes=(4, 3))
KINDS = {"real": CONTINUOUS, "classes": CLASSES, "bits": BITS}

BODIES = {
    "mlp_relu": functools.partial(MLP, hidden_sizes=[5, 4], activation="relu"),
    "mlp_tanh": functools.partial(MLP, hidden_sizes=[5, 4], activation="tanh"),
    "gated_mlp": functools.partial(GatedMLP, hidden_sizes=[5]),
    "lstm_block": functools.partial(LSTMBlockStack, hidden_sizes=[4, 4]),
    "lstm_block_ln": functools.partial(LSTMBlockStack, hidden_sizes=[4], layer_norm=True),
    "lstm_block_input": functools.partial(LSTMBlockStack, hidden_sizes=[4], input_layer=3),
    "lstm_block_input_ln": functools.partial(
        LSTMBlockStack, hidden_sizes=[4], input_layer=3, layer_norm=True
    ),
    "siren": functools.partial(Siren, hidden_sizes=[5, 5]),
}

#: objective -> (schedule, query elements): the online NLL (two elements per step) and
#: the few-shot query loss after three steps on the whole support set
OBJECTIVES = {"online": (ONLINE_2, None), "query": (QUERY_SCHEDULE, 4)}

#: mode -> (grad_mode, the engine options it needs)
MODES = PARITY_MODES

ENGINES = {
    "functional": lambda **o: make_engine("functional", **o),
    "functional_autograd_graph": lambda **o: FunctionalEngine(hand_backward=False, **o),
    "lowrank": lambda **o: make_engine("lowrank", **o),
    "higher": lambda **o: make_engine("higher", **o),
}

#: what an engine cannot do (a clear error at build time, tested elsewhere)
UNSUPPORTED = {("higher", "checkpointed")}

LENGTHS = [6, 3, 5]


def _setup(body: str, kind: str, query: int | None):
    spec = KINDS[kind]
    model = make_model(spec, body=BODIES[body])
    batch = make_batch(spec, num_tasks=3, support=6, query=query, lengths=LENGTHS)
    if spec is BITS:  # two integer coordinates per element (as MNIST's row and column)
        g = torch.Generator().manual_seed(5)

        def draw(n):
            x = [torch.randint(0, k, (3, n), generator=g) for k in BITS.input_sizes]
            return torch.stack(x, -1), torch.randint(0, 2, (3, n), generator=g).double()

        sx, sy = draw(6)
        qx, qy = draw(query) if query else (None, None)
        batch = TaskBatch(sx, sy, batch.support_mask, qx, qy)
    # Siren's first layer (w0 = 30) has gradients in the hundreds: a small inner rate
    # keeps its inner SGD out of the chaotic regime that amplifies rounding differences
    lr = make_lr(model, "per_tensor", init=0.005 if body == "siren" else 0.05)
    return spec, model, batch, lr


@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("body", list(BODIES))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("engine", list(ENGINES))
def test_engine_matches_the_generic_path(engine, mode, body, kind, objective):
    if (engine, mode) in UNSUPPORTED:
        pytest.skip(f"{engine} has no {mode} mode")
    grad_mode, options = MODES[mode]
    ours = ENGINES[engine](**options)
    schedule, query = OBJECTIVES[objective]
    spec, model, batch, lr = _setup(body, kind, query)
    tol = {"rtol": 1e-9, "atol": 1e-9} if body == "siren" else {"rtol": 1e-10, "atol": 1e-12}
    # against finite differences too (not Siren: its w0 = 30 curvature makes them inexact)
    fd = mode in ("second_order", "checkpointed") and engine != "higher" and body != "siren"
    assert_matches_reference(
        ours, options, model, batch, lr, schedule, objective, grad_mode, spec,
        what=f"{engine} {mode} {body} {kind} {objective}", tol=tol,
        fd_rtol=1e-5 if fd else None,
    )  # fmt: skip


def test_every_output_kind_has_a_closed_form_loss():
    """The loss table covers every output kind of a task spec, by the kind the loss
    declares (a spec's own loss, a meta-learner's ``loss_fn``), never by its name."""
    for kind, spec in KINDS.items():
        assert loss_kind(spec.elementwise_loss) == kind
        assert closed_form_loss(spec.elementwise_loss) is LOSSES[kind]

    class Renamed(TaskSpec):
        def elementwise_loss(self, pred, target):
            return super().elementwise_loss(pred, target)

    assert closed_form_loss(Renamed("continuous", "real").elementwise_loss) is None
    assert closed_form_loss(lambda p, y: (p - y).abs().mean(-1)) is None

    class Declared:
        output_kind = "classes"

        def __call__(self, pred, target):
            return CLASSES.elementwise_loss(pred, target)

    assert closed_form_loss(Declared()) is LOSSES["classes"]
    assert loss_kind(MAML(make_model(), CONTINUOUS).loss_fn) == "real"
