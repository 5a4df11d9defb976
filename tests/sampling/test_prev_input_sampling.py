"""Sampling with ``task.prev_input``: the sampler appends each element's previous target,
given or drawn, in the order it steps (float64 where it is compared with training)."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config

from reptile_gen.data.images import pixel_grid
from reptile_gen.sampling import (
    OnlineSampler,
    SamplingError,
    complete,
    complete_images,
    completion_mask,
    generate_images,
    generate_text,
)
from reptile_gen.utils.instantiate import build_run

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = ["task=text", "task.max_len=24", "task.prev_input=true"]
DIGITS = ["task=digits", "model.body.hidden_sizes=[16,16]", "task.prev_input=true"]


def module_of(tmp_path, overrides, double=False):
    precision = ["trainer.precision=64-true"] if double else []
    return build_run(compose_config([*overrides, *precision], tmp_path / "built"))


@pytest.mark.parametrize(
    "overrides",
    [
        [*TEXT, "algorithm.inner_lr_learned=per_tensor"],
        [*TEXT, "algorithm.inner_batch_size=4", "engine=lowrank"],
        [*DIGITS, "algorithm.inner_batch_size=3", "task.pixel_order=random"],
        [*DIGITS, "engine=higher"],
    ],
    ids=["text", "text-batch4-lowrank", "digits-batch3-random-order", "digits-higher"],
)
def test_teacher_forcing_reproduces_the_engine_online_losses(tmp_path, overrides):
    """Fed the elements' coordinates and targets, the sampler builds the inputs the data
    module built and steps as the engine does: the same online losses (float64)."""
    datamodule, module = module_of(tmp_path, overrides, double=True)
    datamodule.setup("test")
    batch = next(iter(datamodule.test_dataloader()))
    with torch.enable_grad():
        expected = module.adapt(batch, "none", module.eval_schedule).element_losses
    coords = module.task_spec.element_coordinates(batch.support_x)
    result = OnlineSampler(module).feed(coords, batch.support_y, batch.support_mask)
    losses = result.element_losses(module.task_spec)
    torch.testing.assert_close(losses, expected, rtol=1e-10, atol=1e-12)
    assert expected.sum() > 0
    with pytest.raises(SamplingError, match="with task.prev_input=true it takes the elements"):
        OnlineSampler(module).feed(batch.support_x, batch.support_y, batch.support_mask)


@pytest.mark.parametrize("overrides", [TEXT, DIGITS], ids=["text", "digits"])
@pytest.mark.parametrize("inner_batch_size", [1, 3])
def test_each_draw_is_fed_back_as_the_next_input(tmp_path, overrides, inner_batch_size):
    """Generation draws element ``i`` from the model whose input carries the drawn
    ``y_{i-1}`` (within a step too): teacher-forcing the drawn sequence gives back the
    very predictions the draws were made from."""
    _, module = module_of(tmp_path, [*overrides, f"algorithm.inner_batch_size={inner_batch_size}"])
    spec = module.task_spec
    x = (
        torch.arange(24).expand(5, -1)
        if spec.kind == "text"
        else pixel_grid(8, 8).expand(5, -1, -1)
    )
    sampler = OnlineSampler(module, temperature=1.0)
    drawn = sampler.run(x, generator=torch.Generator().manual_seed(0), stop_token=None)
    fed = sampler.feed(x, drawn.y)
    torch.testing.assert_close(fed.logits, drawn.logits, rtol=1e-5, atol=1e-5)
    # the first element's input holds the start token
    first = spec.with_previous(x[:1, :1], torch.full((1, 1), spec.start_token))
    with torch.no_grad():
        expected = module.model(first).reshape(-1)
    torch.testing.assert_close(drawn.logits[0, 0], expected)


def test_completion_feeds_the_known_pixels_first_and_continues_from_the_last_one(tmp_path):
    """Known pixels are stepped on first (in the task's order restricted to them), then
    the unknown ones are drawn: the first drawn pixel's previous target is the last known
    pixel's bit, as if the sequence were the known pixels followed by the drawn ones."""
    _, module = module_of(tmp_path, DIGITS)
    coords = pixel_grid(8, 8)
    ck, bk, cu = coords[None, :6], torch.tensor([[1.0, 0, 1, 1, 0, 1]]), coords[None, 6:12]
    out = complete(module, ck, bk, cu, 1e-6)
    sampler = OnlineSampler(module, 1e-6)
    fed = sampler.feed(ck, bk)
    rest = sampler.run(cu, params=fed.params, prev=bk[:, -1])
    assert torch.equal(out, rest.y)
    # top half in raster order: the fed sequence is the raster sequence itself, so every
    # pixel's previous target is its raster predecessor, given or drawn
    images = torch.zeros(2, 8, 8)
    images[:, 2:5, 3:6] = 1.0
    known = completion_mask("top_half", 2, 8, 8)
    completed = complete_images(module, images, known, 1.0, torch.Generator().manual_seed(1))
    teacher = sampler.feed(coords.expand(2, -1, -1), completed.reshape(2, 64))
    again = OnlineSampler(module, 1.0).run(
        coords.expand(2, -1, -1),
        images.reshape(2, 64),
        known.reshape(2, 64),
        generator=torch.Generator().manual_seed(1),
    )
    assert torch.equal(again.y, completed.reshape(2, 64))
    torch.testing.assert_close(again.logits, teacher.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(completed[known], images[known])


def test_generation_runs_on_text_and_images(tmp_path):
    _, text = module_of(tmp_path, TEXT)
    texts = generate_text(text, 3, 1.0, torch.Generator().manual_seed(0), prompt="The ")
    assert len(texts) == 3 and all(t.startswith("The ") for t in texts)
    _, digits = module_of(tmp_path, [*DIGITS, "task.pixel_order=random"])
    images = generate_images(digits, 3, 1.0, torch.Generator().manual_seed(0))
    assert images.shape == (3, 8, 8) and set(images.unique().tolist()) <= {0.0, 1.0}
