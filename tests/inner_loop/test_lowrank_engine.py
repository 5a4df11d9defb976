"""Float64 equality of the low-rank engine (``engine=lowrank``) with the
functional engine: losses along the way, adapted weights (and their task-mean, Reptile's
target), first-order and second-order meta-gradients (learned inner rates included), on
every model body, the discrete (embedding) encoder, padded batches, checkpointing and
truncation; plus its configuration errors and the layers it keeps materialised."""

from __future__ import annotations

import functools
import re

import pytest
import torch
from helpers import (
    CLASSES,
    CONTINUOUS,
    FUNCTIONAL,
    ONLINE_1,
    ONLINE_2,
    QUERY_SCHEDULE,
    assert_all_close,
    flat,
    make_batch,
    make_lr,
    make_model,
    meta_grads,
    wrt,
)
from torch import nn

from reptile_gen.algorithms import MAML, Reptile
from reptile_gen.inner_loop import LowRankEngine, make_engine
from reptile_gen.inner_loop.lowrank.run import Run
from reptile_gen.inner_loop.lowrank.sites import candidate_sites
from reptile_gen.models import MLP, GatedMLP, LSTMBlockStack, Siren
from reptile_gen.sampling import OnlineSampler, check_sampleable
from reptile_gen.utils.instantiate import build_run

LOWRANK = make_engine("lowrank")

BODIES = {
    "mlp_relu": functools.partial(MLP, hidden_sizes=[6, 6], activation="relu"),
    "mlp_tanh": functools.partial(MLP, hidden_sizes=[6, 6], activation="tanh"),
    "gated_mlp": functools.partial(GatedMLP, hidden_sizes=[6, 6]),
    "lstm_block": functools.partial(LSTMBlockStack, hidden_sizes=[5, 5]),
    "lstm_block_input_ln": functools.partial(
        LSTMBlockStack, hidden_sizes=[5], input_layer=4, layer_norm=True
    ),
    "siren": functools.partial(Siren, hidden_sizes=[6, 6]),
}
#: (objective, schedule): few-shot query objective over 3 steps on the whole support set,
#: the online NLL one element per step, and two elements per step (the last step short)
CASES = {
    "query3": ("query", QUERY_SCHEDULE),
    "online1": ("online", ONLINE_1),
    "online2": ("online", ONLINE_2),
}
TIGHT = {"rtol": 1e-10, "atol": 1e-12}


def _run(engine, model, batch, lr, schedule, grad_mode, spec=CONTINUOUS, **kw):
    return engine.run(model, batch, spec.elementwise_loss, lr, schedule, grad_mode, **kw)


def _no_graph_results(model, batch, lr, schedule, spec=CONTINUOUS, engine=LOWRANK, **tol):
    """Reptile's / evaluation's run (no graph): every loss, the adapted weights and
    their task-mean are the functional engine's."""
    tol = tol or TIGHT
    kw = {"track_query": batch.has_query, "return_adapted": True}
    with torch.enable_grad():
        ref = _run(FUNCTIONAL, model, batch, lr, schedule, "none", spec, **kw)
        ours = _run(engine, model, batch, lr, schedule, "none", spec, **kw)
        mean = _run(engine, model, batch, lr, schedule, "none", spec, return_adapted="mean")
    for field in ("step_losses", "element_losses", "query_losses"):
        a, b = getattr(ours, field), getattr(ref, field)
        assert (a is None) == (b is None), field
        if a is not None:
            torch.testing.assert_close(a, b, **tol, msg=field)
    assert ours.adapted.keys() == ref.adapted.keys() == mean.adapted_mean.keys()
    assert mean.adapted is None
    for name, phi in ref.adapted.items():
        torch.testing.assert_close(ours.adapted[name], phi, **tol, msg=name)
        torch.testing.assert_close(mean.adapted_mean[name], phi.mean(0), **tol, msg=name)
        torch.testing.assert_close(mean.mean_adapted()[name], ref.mean_adapted()[name], **tol)
    # the untracked final query loss (from the final history) equals the tracked one
    if batch.has_query:
        torch.testing.assert_close(mean.query_losses[:, 0], ref.query_losses[:, -1], **tol)


@pytest.mark.parametrize("learned", ["none", "scalar"])
@pytest.mark.parametrize("case", list(CASES))
def test_discrete_inputs_embeddings_match(case, learned):
    """Embedding tables in low-rank form (index history), cross-entropy, padding."""
    kind, schedule = CASES[case]
    model = make_model(CLASSES)
    batch = make_batch(CLASSES, num_tasks=3, support=6, lengths=[6, 2, 5])
    lr = make_lr(model, learned)
    _no_graph_results(model, batch, lr, schedule, CLASSES)
    for grad_mode in ("first_order", "second_order"):
        va, ga = meta_grads(FUNCTIONAL, model, batch, lr, schedule, kind, grad_mode, CLASSES)
        vb, gb = meta_grads(LOWRANK, model, batch, lr, schedule, kind, grad_mode, CLASSES)
        torch.testing.assert_close(vb, va, **TIGHT)
        assert_all_close(gb, ga, what=f"classes {grad_mode}")
        assert flat(ga).abs().max() > 1e-3


def test_repeated_positions_in_the_embedding_history():
    """A few-shot discrete task revisits the same indices at every step: the correction
    of a lookup sums every earlier update of that row."""
    model = make_model(CLASSES)
    batch = make_batch(CLASSES, num_tasks=2, support=7, query=5)
    assert batch.support_x.unique().numel() < 14  # repeats within and across steps
    lr = make_lr(model, "scalar", init=0.3)
    _no_graph_results(model, batch, lr, QUERY_SCHEDULE, CLASSES)
    va, ga = meta_grads(
        FUNCTIONAL, model, batch, lr, QUERY_SCHEDULE, "query", "second_order", CLASSES
    )
    vb, gb = meta_grads(LOWRANK, model, batch, lr, QUERY_SCHEDULE, "query", "second_order", CLASSES)
    torch.testing.assert_close(vb, va, **TIGHT)
    assert_all_close(gb, ga, what="few-shot classes")


# -------------------------------------------------------------- long unrolls
#: 12 online steps on padded sequences, a query set scored after every step
LONG = {"support": 12, "lengths": [12, 9, 11], "query": 3}


@pytest.mark.parametrize(
    ("segments", "truncate"), [("auto", None), (5, None), (50, None), (3, 4), ("auto", 1)]
)
def test_checkpointed_and_truncated_second_order(segments, truncate):
    """Checkpointed segments (recomputed in backward with the history prefix as a leaf)
    and truncation give the functional engine's meta-gradients, also of the per-step
    query losses and the adapted weights."""
    model = make_model()
    batch = make_batch(**LONG)
    lr = make_lr(model, "scalar", init=0.15)
    ref_engine = make_engine("functional", truncate_steps=truncate)
    engine = make_engine("lowrank", checkpoint_segments=segments, truncate_steps=truncate)
    outs = []
    for e in (ref_engine, engine):
        kw = {"track_query": True, "return_adapted": True}
        result = _run(e, model, batch, lr, ONLINE_1, "second_order", **kw)
        total = result.element_losses.sum() + result.query_losses.sum()
        total = total + sum((phi**2).sum() for phi in result.adapted.values())
        outs.append((result, torch.autograd.grad(total, wrt(model, lr))))
    (ref, g_ref), (ours, g_ours) = outs
    for field in ("step_losses", "element_losses", "query_losses"):
        torch.testing.assert_close(getattr(ours, field), getattr(ref, field), **TIGHT)
    for name, phi in ref.adapted.items():
        torch.testing.assert_close(ours.adapted[name], phi, **TIGHT)
    assert_all_close(g_ours, g_ref, what=f"segments={segments} truncate={truncate}")
    assert flat(g_ref).abs().max() > 1e-3


@pytest.mark.parametrize("fold", ["auto", "always", "never"])
def test_checkpointed_embeddings_and_lstm_block(fold):
    """Checkpointing with an index history (embeddings) and the LSTM block's once-per-step
    ``state_to_gates`` rows; per-tensor rates. The recomputed segments read the history
    before them as rows or folded into a dense per-task delta (by size; both forced)."""
    body = functools.partial(LSTMBlockStack, hidden_sizes=[4], input_layer=3, layer_norm=True)
    model = make_model(CLASSES, body=body)
    batch = make_batch(CLASSES, num_tasks=2, support=9, query=None, lengths=[9, 6])
    lr = make_lr(model, "per_tensor")
    _, g_ref = meta_grads(FUNCTIONAL, model, batch, lr, ONLINE_2, "online", "second_order", CLASSES)
    engine = LowRankEngine(checkpoint_segments=3, fold=fold)
    _, g = meta_grads(engine, model, batch, lr, ONLINE_2, "online", "second_order", CLASSES)
    assert_all_close(g, g_ref, what="checkpointed, embeddings + LSTM block")


# -------------------------------------------------------------- algorithms & options
def test_reptile_and_maml_modules_match_the_functional_engine():
    """Reptile's surrogate gradient (from the task-mean computed without per-task
    weights) and MAML's meta-gradient through the LightningModules."""
    batch = make_batch(CLASSES, num_tasks=3, support=6, query=None, lengths=[6, 4, 5])
    for cls in (Reptile, MAML):
        grads = []
        for engine in ("functional", "lowrank"):
            model = make_model(CLASSES)
            module = cls(
                model,
                CLASSES,
                engine={"name": engine},
                inner_lr=0.2,
                inner_steps=None,
                objective="online",
            )
            module = module.double()
            loss, _ = module.meta_loss(batch)
            grads.append(torch.autograd.grad(loss, list(model.parameters())))
        assert_all_close(grads[1], grads[0], what=cls.__name__)


def test_task_chunks_equal_one_pass():
    model = make_model()
    batch = make_batch(num_tasks=5, lengths=[5, 3, 4, 5, 1])
    lr = make_lr(model, "scalar")
    chunked = LowRankEngine(chunk_size=2)
    va, ga = meta_grads(LOWRANK, model, batch, lr, ONLINE_1, "online", "second_order")
    vb, gb = meta_grads(chunked, model, batch, lr, ONLINE_1, "online", "second_order")
    torch.testing.assert_close(vb, va, **TIGHT)
    assert_all_close(gb, ga, what="chunked")
    with torch.enable_grad():
        a = _run(LOWRANK, model, batch, lr, ONLINE_1, "none", return_adapted="mean")
        b = _run(chunked, model, batch, lr, ONLINE_1, "none", return_adapted="mean")
    torch.testing.assert_close(b.element_losses, a.element_losses, **TIGHT)
    for name, phi in a.adapted_mean.items():
        torch.testing.assert_close(b.adapted_mean[name], phi, **TIGHT)


class _TiedModel(nn.Module):
    """An embedding tied to the output layer, an embedding with a padding row, and a
    subclass of ``nn.Linear`` (all kept as materialised per-task tensors), next to a
    plain linear layer (low-rank)."""

    class _Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(8, 4)
        self.pad_emb = nn.Embedding(8, 4, padding_idx=0)
        self.mid = self._Scaled(4, 4)
        self.plain = nn.Linear(4, 4)
        self.out = nn.Linear(4, 8)
        self.out.weight = self.emb.weight

    def forward(self, x):
        x = x.squeeze(-1).long()
        return self.out(torch.tanh(self.plain(self.mid(self.emb(x) + self.pad_emb(x)))))


def test_tied_padded_and_subclassed_layers_stay_materialised():
    torch.manual_seed(0)
    model = _TiedModel().double()
    spec = type(CLASSES)("discrete", "classes", input_sizes=(8,), output_dim=8)
    batch = make_batch(spec, num_tasks=2, support=5, lengths=[5, 3])
    lr = make_lr(model, "scalar")
    assert [s.name for s in candidate_sites(model)] == ["plain.weight"]
    _no_graph_results(model, batch, lr, ONLINE_1, spec)
    _, ga = meta_grads(FUNCTIONAL, model, batch, lr, ONLINE_1, "online", "second_order", spec)
    _, gb = meta_grads(LOWRANK, model, batch, lr, ONLINE_1, "online", "second_order", spec)
    assert_all_close(gb, ga, what="tied model")


def test_all_padding_task_is_a_no_op():
    model = make_model()
    batch = make_batch(lengths=[5, 0, 2])
    lr = make_lr(model)
    theta = dict(model.named_parameters())
    with torch.enable_grad():
        r = _run(LOWRANK, model, batch, lr, ONLINE_2, "none", return_adapted=True)
    assert r.element_losses[1].abs().max() == 0 and r.step_losses[1].abs().max() == 0
    for name, phi in r.adapted.items():
        torch.testing.assert_close(phi[1], theta[name].detach(), rtol=0, atol=0)


# ------------------------------------------------------------------------- errors
ALLOWED_RATES = (
    "allowed: none, scalar, per_tensor, per_step, per_layer_per_step, per_unit "
    "(or engine=functional|higher)"
)


def test_per_parameter_rates_are_a_clear_error(make_cfg):
    message = (
        "algorithm.inner_lr_learned='per_parameter' with engine=lowrank: a "
        "per-parameter rate matrix does not factor out of the low-rank update; " + ALLOWED_RATES
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        MAML(make_model(), CONTINUOUS, engine={"name": "lowrank"}, inner_lr_learned="per_parameter")
    model = make_model()
    with pytest.raises(ValueError, match=re.escape(message)):  # the engine run directly
        _run(LOWRANK, model, make_batch(), make_lr(model, "per_parameter"), ONLINE_1, "none")
    cfg = make_cfg(["engine=lowrank", "algorithm.inner_lr_learned=per_parameter"])
    with pytest.raises(ValueError, match=re.escape(message)):
        build_run(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["+engine.inner_optimizer.name=adam"],
            "engine.inner_optimizer={name: adam, {}} with engine=lowrank: "
            "the low-rank engine runs plain SGD",
        ),
        (["algorithm.checkpoint_segments=0"], "algorithm.checkpoint_segments=0; allowed:"),
        (["algorithm.truncate_steps=-1"], "algorithm.truncate_steps=-1; allowed:"),
        (["engine.chunk_size=0"], "engine.chunk_size=0; allowed: null or"),
        (["engine.fold=sideways"], "engine.fold='sideways': how the low-rank engine"),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else "",
)
def test_bad_options_are_clear_errors(make_cfg, overrides, message):
    cfg = make_cfg(["engine=lowrank", *overrides])
    with pytest.raises(ValueError, match=re.escape(message)):
        build_run(cfg)


def test_good_config_builds(make_cfg):
    overrides = ["task=digits", "model=lstm_block", "engine=lowrank"]
    cfg = make_cfg(
        [*overrides, "algorithm.checkpoint_segments=auto", "algorithm.inner_lr_learned=per_tensor"]
    )
    _, module = build_run(cfg)
    assert isinstance(module.engine, LowRankEngine)
    assert module.engine.checkpoint_segments == "auto"


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(1, 1)

    def forward(self, x):
        return self.layer(torch.tanh(self.layer(x)))


def test_a_layer_run_twice_is_a_clear_error():
    model = _Twice().double()
    with pytest.raises(RuntimeError, match=re.escape("'layer.weight' ran twice")):
        _run(LOWRANK, model, make_batch(), make_lr(model), ONLINE_1, "none")


def test_sampler_replays_the_lowrank_inner_loop(make_cfg):
    """The sampler (plain SGD replayed per sample) accepts a lowrank checkpoint, and its
    teacher-forced online losses are the engine's (digits, float64, batches of 3)."""
    overrides = ["task=digits", "model.body.hidden_sizes=[16,16]", "algorithm.inner_batch_size=3"]
    cfg = make_cfg([*overrides, "engine=lowrank", "trainer.precision=64-true"])
    datamodule, module = build_run(cfg)
    check_sampleable(module)
    datamodule.setup("test")
    batch = next(iter(datamodule.test_dataloader()))
    with torch.enable_grad():
        expected = module.adapt(batch, "none", module.eval_schedule).element_losses
    result = OnlineSampler(module).feed(batch.support_x, batch.support_y, batch.support_mask)
    losses = result.element_losses(module.task_spec)
    torch.testing.assert_close(losses, expected, rtol=1e-10, atol=1e-12)


# -------------------------------------------------------------- idle (padding-only) steps
#: tasks out of length order, one empty: the engine sorts them by last active step and
#: runs each step on the tasks that still have real elements
UNSORTED_LENGTHS = [2, 6, 0, 5, 3]


def _poisoned(sizes: list | None = None, **options) -> LowRankEngine:
    """A low-rank engine whose history buffers start as NaN (and out-of-range indices):
    rows of idle steps that a step skips must never be read unwritten. ``sizes``
    receives the number of tasks of every inner step."""
    on_step = None if sizes is None else (lambda kind, n: sizes.append(n))
    return LowRankEngine(poison_history=True, on_step=on_step, **options)


@pytest.mark.parametrize("spec", ["continuous", "classes"])
def test_idle_steps_are_skipped_exactly(spec):
    """Padding-only steps of a task are skipped (the step runs on the active prefix of
    the sorted tasks); losses, adapted weights, their mean and first-, second-order and
    checkpointed meta-gradients stay the functional engine's, in the original task order."""
    sizes = []
    spec = CONTINUOUS if spec == "continuous" else CLASSES
    model = make_model(spec)
    batch = make_batch(spec, num_tasks=5, support=6, query=None, lengths=UNSORTED_LENGTHS)
    lr = make_lr(model, "per_tensor")
    _no_graph_results(model, batch, lr, ONLINE_1, spec, engine=_poisoned(sizes))
    # one element per step: step i runs on the tasks longer than i
    assert sizes[:6] == [4, 4, 3, 2, 2, 1]
    truncated = make_engine("functional", truncate_steps=2)
    for grad_mode, ref, engine in [
        ("first_order", FUNCTIONAL, _poisoned(sizes)),
        ("second_order", FUNCTIONAL, _poisoned(sizes)),
        ("second_order", FUNCTIONAL, _poisoned(sizes, checkpoint_segments=2)),
        ("second_order", truncated, _poisoned(sizes, truncate_steps=2)),
    ]:
        va, ga = meta_grads(ref, model, batch, lr, ONLINE_1, "online", grad_mode, spec)
        sizes.clear()
        vb, gb = meta_grads(engine, model, batch, lr, ONLINE_1, "online", grad_mode, spec)
        assert sizes[:6] == [4, 4, 3, 2, 2, 1]  # the steps with a graph skip them too
        torch.testing.assert_close(vb, va, **TIGHT)
        assert_all_close(gb, ga, what=f"idle steps {grad_mode}")


def test_idle_steps_with_query_tracking():
    """Query losses after every step (idle tasks included) and chunked runs."""
    model = make_model()
    batch = make_batch(num_tasks=5, support=6, lengths=UNSORTED_LENGTHS)
    lr = make_lr(model, "scalar")
    _no_graph_results(model, batch, lr, ONLINE_2, engine=_poisoned())
    with torch.enable_grad():
        kw = {"track_query": True, "return_adapted": "mean"}
        a = _run(_poisoned(), model, batch, lr, ONLINE_1, "none", **kw)
        b = _run(_poisoned(chunk_size=2), model, batch, lr, ONLINE_1, "none", **kw)
    for field in ("step_losses", "element_losses", "query_losses"):
        torch.testing.assert_close(getattr(b, field), getattr(a, field), **TIGHT)
    for name, phi in a.adapted_mean.items():
        torch.testing.assert_close(b.adapted_mean[name], phi, **TIGHT)


# -------------------------------------------------------------- hand-written MLP step
TWO_TABLES = type(CLASSES)("discrete", "classes", input_sizes=(4, 5), output_dim=5)
BITS = type(CLASSES)("continuous", "bits", input_dim=3)


def _stepper_of(model, batch, spec, lr, schedule=ONLINE_1):
    run = Run(LOWRANK, model, batch, spec.elementwise_loss, lr, schedule, "none")
    return run.fast


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("spec", ["continuous", "classes", "two_tables", "bits"])
@pytest.mark.parametrize("case", list(CASES))
def test_mlp_fast_step_matches(spec, activation, case):
    """The hand-written no-graph step (plain MLP: Reptile, evaluation, the checkpointed
    forward) gives the functional engine's losses, adapted weights and their mean, and
    the checkpointed second-order meta-gradient; the general step is not called."""
    _, schedule = CASES[case]
    spec = {"continuous": CONTINUOUS, "classes": CLASSES, "two_tables": TWO_TABLES, "bits": BITS}[
        spec
    ]
    body = functools.partial(MLP, hidden_sizes=[6, 5], activation=activation)
    model = make_model(spec, body=body)
    query = 4 if case == "query3" else None
    batch = make_batch(spec, num_tasks=4, support=6, query=query, lengths=[6, 2, 5, 3])
    if spec is TWO_TABLES:  # two integer coordinates per element (e.g. pixel row, column)
        g = torch.Generator().manual_seed(3)

        def coords(t):
            return torch.stack([torch.randint(0, k, t.shape[:2], generator=g) for k in (4, 5)], -1)

        batch = batch.map(lambda t: t)
        batch.support_x = coords(batch.support_x)
        if query:
            batch.query_x = coords(batch.query_x)
    lr = make_lr(model, "per_tensor", init=0.1)
    assert _stepper_of(model, batch, spec, lr, schedule) is not None

    kinds = []
    engine = LowRankEngine(on_step=lambda kind, n: kinds.append(kind))
    _no_graph_results(model, batch, lr, schedule, spec, engine=engine)
    assert kinds and set(kinds) == {"fast"}  # the general step never ran
    engine = make_engine("lowrank", checkpoint_segments=2)
    kind = "query" if query else "online"
    _, ga = meta_grads(FUNCTIONAL, model, batch, lr, schedule, kind, "second_order", spec)
    _, gb = meta_grads(engine, model, batch, lr, schedule, kind, "second_order", spec)
    assert_all_close(gb, ga, what="checkpointed forward on the fast step")


def test_mlp_fast_step_is_used_only_for_plain_mlps():
    lr_for = functools.partial(make_lr, learned="scalar")
    batch = make_batch()
    for body in ("mlp_relu", "mlp_tanh"):
        model = make_model(body=BODIES[body])
        assert _stepper_of(model, batch, CONTINUOUS, lr_for(model)) is not None
    model = make_model(body=functools.partial(MLP, hidden_sizes=[6], activation="gelu"))
    assert _stepper_of(model, batch, CONTINUOUS, lr_for(model)) is None
    for body in ("gated_mlp", "lstm_block", "siren"):
        model = make_model(body=BODIES[body])
        assert _stepper_of(model, batch, CONTINUOUS, lr_for(model)) is None
    model = make_model()
    model.head.weight.requires_grad_(False)  # a frozen weight: not in low-rank form
    assert _stepper_of(model, batch, CONTINUOUS, lr_for(model)) is None
