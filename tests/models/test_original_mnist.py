"""``model=original_mnist``: the original reptile-gen MNIST body (one state vector as both
the hidden vector and the cell state, four gate layers per block), its sizes through Hydra,
its function against a hand-written formula, and its float64 meta-gradients on every
engine against each other and against finite differences."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import compose_config
from helpers import (
    CLASSES,
    FUNCTIONAL,
    HIGHER,
    ONLINE_1,
    assert_all_close,
    directional_fd,
    make_batch,
    make_lr,
    make_model,
    meta_grads,
    run_objective,
    wrt,
)

from reptile_gen.inner_loop import make_engine
from reptile_gen.models.shared_state_lstm import SharedStateLSTMBlock, SharedStateLSTMStack
from reptile_gen.utils.instantiate import build_run

BODY = functools.partial(SharedStateLSTMStack, width=4, num_blocks=2)


def test_config_builds_the_original_sizes(tmp_path):
    """Embeddings 2 x (28 x 128), 256 -> 256 + LayerNorm, two blocks of four 512 -> 256
    gate layers and a 256 state + LayerNorm, a 256 -> 1 head."""
    cfg = compose_config(["experiment=mnist_reptile", "model=original_mnist"], output_dir=tmp_path)
    _, module = build_run(cfg)
    shapes = {n: tuple(p.shape) for n, p in module.model.named_parameters()}
    gates = [
        s for n, s in shapes.items() if n.endswith("gate.weight") or n.endswith("update.weight")
    ]
    assert gates == [(256, 512)] * 8
    expected = 2 * 28 * 128 + (256 * 256 + 256) + 2 * 256
    expected += 2 * (256 + 4 * (512 * 256 + 256) + 2 * 256) + 257
    assert sum(p.numel() for p in module.model.parameters()) == expected


def test_block_is_the_shared_state_cell():
    torch.manual_seed(0)
    block = SharedStateLSTMBlock(3).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    s = block.state.detach()
    # all four gates as one stacked matrix product, split afterwards
    weight = torch.cat(
        [g.weight for g in (block.forget_gate, block.input_gate, block.output_gate, block.update)]
    )
    bias = torch.cat(
        [g.bias for g in (block.forget_gate, block.input_gate, block.output_gate, block.update)]
    )
    pre = torch.cat([s.expand(5, 3), x], -1) @ weight.T + bias
    f, i, o, u = pre.split(3, dim=-1)
    expected = torch.sigmoid(o) * (torch.sigmoid(i) * torch.tanh(u) + torch.sigmoid(f) * s)
    torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [{"width": 0}, {"num_blocks": 0}])
def test_bad_sizes_name_the_key(bad):
    with pytest.raises(ValueError, match=f"model.body.{next(iter(bad))}="):
        SharedStateLSTMStack(4, **bad)


@pytest.mark.parametrize("grad_mode", ["first_order", "second_order"])
def test_engines_agree_on_the_original_body(grad_mode):
    """Online NLL (one element per step) on a padded discrete batch, per-tensor learned
    rates: functional, low-rank and higher give the same meta-gradient in float64."""
    model = make_model(CLASSES, body=BODY)
    batch = make_batch(CLASSES, num_tasks=3, support=6, lengths=[6, 2, 5])
    lr = make_lr(model, "per_tensor", init=0.05)
    va, ga = meta_grads(FUNCTIONAL, model, batch, lr, ONLINE_1, "online", grad_mode, CLASSES)
    for engine in (make_engine("lowrank"), HIGHER):
        vb, gb = meta_grads(engine, model, batch, lr, ONLINE_1, "online", grad_mode, CLASSES)
        torch.testing.assert_close(vb, va, rtol=1e-10, atol=1e-12)
        assert_all_close(gb, ga, rtol=1e-9, atol=1e-11, what=f"{engine.name} {grad_mode}")
    assert max(g.abs().max() for g in ga) > 1e-3


def test_second_order_meta_gradient_matches_finite_differences():
    model = make_model(CLASSES, body=BODY)
    batch = make_batch(CLASSES, num_tasks=2, support=4, lengths=[4, 3])
    lr = make_lr(model, "scalar", init=0.1)
    _, grads = meta_grads(FUNCTIONAL, model, batch, lr, ONLINE_1, "online", "second_order", CLASSES)
    params = wrt(model, lr)
    g = torch.Generator().manual_seed(3)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]

    def value():
        with torch.no_grad():
            return float(
                run_objective(FUNCTIONAL, model, batch, lr, ONLINE_1, "online", "none", CLASSES)
            )

    fd = directional_fd(value, params, direction)
    analytic = sum(float((gi * d).sum()) for gi, d in zip(grads, direction))
    assert analytic == pytest.approx(fd, rel=1e-6, abs=1e-8)
