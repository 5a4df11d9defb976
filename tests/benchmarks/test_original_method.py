"""The ``original_method`` benchmark baseline (per-task weight copies, the original
reptile-gen's algorithm) gives the project's own meta-gradient in float64: Reptile,
first-order MAML and second-order MAML with the full unroll and checkpointed, on text-like
(classes) and image-like (bits) sequences, padded and all-real."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import assert_all_close, make_batch, make_model

from benchmarks.original_method import all_positions_real, original_method_meta_loss
from reptile_gen.algorithms import FOMAML, MAML, Reptile
from reptile_gen.data.task_spec import TaskSpec
from reptile_gen.models import GatedMLP
from reptile_gen.models.shared_state_lstm import SharedStateLSTMStack

TEXT = TaskSpec("discrete", "classes", input_sizes=(8,), output_dim=5, sequential=True)
PIXELS = TaskSpec("discrete", "bits", input_sizes=(3, 3), sequential=True)
BODIES = {
    "gated_mlp": functools.partial(GatedMLP, hidden_sizes=[6, 6]),
    "original_mnist": functools.partial(SharedStateLSTMStack, width=4, num_blocks=1),
}
MODES = {
    "reptile": (Reptile, {}),
    "fomaml": (FOMAML, {}),
    "maml_full": (MAML, {}),
    "maml_ckpt": (MAML, {"checkpoint_segments": "auto"}),
    "maml_ckpt2": (MAML, {"checkpoint_segments": 2}),
}


def _grads(module, loss_fn, batch):
    module.zero_grad()
    loss, _ = loss_fn(batch)
    loss.backward()
    return [p.grad.clone() for p in module.model.parameters()]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("spec_name", ["text", "pixels"])
@pytest.mark.parametrize("body", list(BODIES))
def test_original_method_equals_the_module(mode, spec_name, body):
    spec = TEXT if spec_name == "text" else PIXELS
    cls, options = MODES[mode]
    model = make_model(spec, body=BODIES[body])
    module = cls(model, spec, inner_lr=0.2, inner_batch_size=1, **options).double()
    batch = make_batch(spec, num_tasks=3, support=7, query=None, lengths=[7, 4, 6])
    if spec.output_kind == "bits":
        g = torch.Generator().manual_seed(4)
        x = torch.randint(0, 3, (3, 7, 2), generator=g)
        y = torch.randint(0, 2, (3, 7), generator=g).double()
        batch = type(batch)(x, y, batch.support_mask, None, None)
    ours = _grads(module, module.meta_loss, batch)
    theirs = _grads(module, lambda b: original_method_meta_loss(module, b), batch)
    assert_all_close(theirs, ours, rtol=1e-10, atol=1e-12, what=f"{mode} {spec_name} {body}")
    assert max(float(g.abs().max()) for g in ours) > 1e-4


def test_all_positions_real_unmasks_every_position():
    batch = make_batch(TEXT, num_tasks=2, support=5, query=None, lengths=[5, 2])

    def source(datamodule, num_batches, seed):
        return [batch] * num_batches

    out = all_positions_real(source)(None, 2, 0)
    assert len(out) == 2 and all(bool(b.support_mask.all()) for b in out)
    assert not bool(batch.support_mask.all())


def test_refuses_what_it_does_not_cover():
    model = make_model(TEXT)
    module = Reptile(model, TEXT, inner_lr=0.1, inner_lr_learned="none").double()
    few_shot = MAML(make_model(), TaskSpec("continuous", "real"), inner_steps=2).double()
    with pytest.raises(ValueError, match="online objective"):
        original_method_meta_loss(few_shot, make_batch())
    assert module.grad_mode == "none"
