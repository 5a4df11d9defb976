"""The low-rank engine's dense fold (``fold=auto|always|never``): the buffered loop folds
each site's history into a per-task dense delta as it goes (tiny layers: after a few
steps), and every mode still gives the functional engine's losses, adapted weights and
meta-gradients in float64, padded (idle) tasks included."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import (
    CLASSES,
    CONTINUOUS,
    FUNCTIONAL,
    ONLINE_1,
    assert_all_close,
    make_batch,
    make_lr,
    make_model,
    meta_grads,
)

from reptile_gen.inner_loop import LowRankEngine, make_engine
from reptile_gen.inner_loop.lowrank import fold as fold_module
from reptile_gen.inner_loop.lowrank.fold import fold_every
from reptile_gen.inner_loop.lowrank.sites import Site
from reptile_gen.models import MLP, GatedMLP
from reptile_gen.models.shared_state_lstm import SharedStateLSTMStack

TIGHT = {"rtol": 1e-10, "atol": 1e-12}
#: (spec, body, learned rates): the MLP fast step with embedding tables, the general step
#: on a gated MLP, and the original's MNIST block (shared state) with embeddings
BODIES = {
    "mlp_classes": (CLASSES, functools.partial(MLP, hidden_sizes=[5, 4]), "per_tensor"),
    "gated_mlp": (CONTINUOUS, functools.partial(GatedMLP, hidden_sizes=[4]), "scalar"),
    "original_mnist": (
        CLASSES,
        functools.partial(SharedStateLSTMStack, width=3, num_blocks=1),
        "per_tensor",
    ),
}


@pytest.fixture
def fold_count(monkeypatch):
    """The number of in-place folds of the buffered loop during the test."""
    count = [0]
    original = fold_module.DenseHistory._fold

    def counted(self, *args):
        count[0] += 1
        return original(self, *args)

    monkeypatch.setattr(fold_module.DenseHistory, "_fold", counted)
    return count


@pytest.mark.parametrize("fold", ["auto", "always", "never"])
@pytest.mark.parametrize("body", list(BODIES))
def test_every_mode_matches_with_folding(body, fold, fold_count):
    spec, make_body, learned = BODIES[body]
    model = make_model(spec, body=make_body)
    batch = make_batch(spec, num_tasks=3, support=9, query=3, lengths=[9, 4, 7])
    lr = make_lr(model, learned, init=0.15)
    loss = spec.elementwise_loss
    engine = functools.partial(LowRankEngine, fold=fold, poison_history=True)
    # no graph (Reptile, evaluation): tracked query losses, adapted weights, their mean
    kw = {"track_query": True, "return_adapted": True}
    with torch.enable_grad():
        ref = FUNCTIONAL.run(model, batch, loss, lr, ONLINE_1, "none", **kw)
        ours = engine().run(model, batch, loss, lr, ONLINE_1, "none", **kw)
        mean = engine().run(model, batch, loss, lr, ONLINE_1, "none", return_adapted="mean")
    for field in ("step_losses", "element_losses", "query_losses"):
        torch.testing.assert_close(getattr(ours, field), getattr(ref, field), **TIGHT)
    for name, phi in ref.adapted.items():
        torch.testing.assert_close(ours.adapted[name], phi, **TIGHT)
        torch.testing.assert_close(mean.adapted_mean[name], phi.mean(0), **TIGHT)
    # first order, checkpointed second order, truncated second order (graph after folds)
    for grad_mode, ref_engine, ours_engine in [
        ("first_order", FUNCTIONAL, engine()),
        ("second_order", FUNCTIONAL, engine(checkpoint_segments=3)),
        ("second_order", make_engine("functional", truncate_steps=3), engine(truncate_steps=3)),
    ]:
        va, ga = meta_grads(ref_engine, model, batch, lr, ONLINE_1, "online", grad_mode, spec)
        vb, gb = meta_grads(ours_engine, model, batch, lr, ONLINE_1, "online", grad_mode, spec)
        torch.testing.assert_close(vb, va, **TIGHT)
        assert_all_close(gb, ga, what=f"{body} fold={fold} {grad_mode}")
    assert (fold_count[0] > 0) == (fold != "never")


def test_cost_model():
    """A layer folds once its rows cost a dense delta, then every ~sqrt(2 s in out /
    (in + out)) rows; a run with a graph refolds only at the first threshold; MNIST's
    512 -> 256 gate layers make their delta after 171 one-row steps and fold every 18."""
    site = Site("w", None, False, rows=1, in_width=512, out_width=256)
    weight = torch.empty(256, 512)
    assert fold_every(site, weight, "auto", False) == (171, 18)
    assert fold_every(site, weight, "auto", True) == (171, 171)
    assert fold_every(site, weight, "never", False) == (0, 0)
    assert fold_every(site, weight, "always", False) == (1, 1)
    # text's 512 x 512 layers (one row a step) stay rows for 128 steps
    text = Site("w", None, False, rows=1, in_width=512, out_width=512)
    assert fold_every(text, torch.empty(512, 512), "auto", False)[0] > 128
