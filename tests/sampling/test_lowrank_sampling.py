"""The sampler's low-rank path (reptile_gen.sampling.lowrank) against its weights path: in
float64 with the same seed, the same draws, the same per-element predictions (hence
log-probabilities) and the same adapted parameters, for an MLP and a gated MLP body, on
image and text tasks, generating and conditioned (completion, prompts, prev_input); and
which path ``auto`` takes, and the clear refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config

from reptile_gen.data.task_batch import TaskBatch
from reptile_gen.data.text import END_TOKEN
from reptile_gen.inner_loop.lowrank.online import OnlineRun
from reptile_gen.sampling import (
    OnlineSampler,
    SamplingError,
    complete_images,
    completion_mask,
    generate_images,
    generate_text,
    sampling_path,
)
from reptile_gen.utils.instantiate import build_run

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = ["task=text", "task.max_len=24"]
DIGITS = ["task=digits"]
MLP = ["model.body.hidden_sizes=[16,16]"]
GATED = ["model=gated_mlp", "model.body.hidden_sizes=[12,12]", "model.embedding_dim=8"]

CASES = {
    "digits-mlp": [*DIGITS, *MLP],
    "digits-mlp-chunks-of-2": [*DIGITS, *MLP, "engine.chunk_size=2"],
    "digits-gated-per_tensor": [*DIGITS, *GATED, "algorithm.inner_lr_learned=per_tensor"],
    "digits-mlp-batch3-per_step-list": [
        *DIGITS,
        *MLP,
        "algorithm.inner_batch_size=3",
        "algorithm.inner_lr_learned=per_layer_per_step",
        "algorithm.inner_lr_buckets=5",
        "algorithm.inner_lr_schedule=[1.0,0.5,0.25]",
    ],
    "digits-gated-prev_input-random-order": [
        *DIGITS,
        *GATED,
        "task.prev_input=true",
        "task.pixel_order=random",
    ],
    "digits-gated-per_unit": [*DIGITS, *GATED, "algorithm.inner_lr_learned=per_unit"],
    "text-mlp-scalar": [*TEXT, *MLP, "algorithm.inner_lr_learned=scalar"],
    "text-gated-batch2-linear": [
        *TEXT,
        *GATED,
        "algorithm.inner_batch_size=2",
        "algorithm.inner_lr_schedule=linear",
    ],
    "text-mlp-prev_input-per_step": [
        *TEXT,
        *MLP,
        "task.prev_input=true",
        "algorithm.inner_lr_learned=per_step",
    ],
}


def module_of(tmp_path, overrides):
    """An untrained float64 module (on ``engine=lowrank`` unless the overrides say
    otherwise), its learned rates (if any) far
    from their init and large enough that the samples' dynamics matter."""
    cfg = compose_config(
        ["engine=lowrank", "trainer.precision=64-true", "algorithm.inner_lr=0.3", *overrides],
        tmp_path / "built",
    )
    datamodule, module = build_run(cfg)
    generator = torch.Generator().manual_seed(1)
    for rates in module.inner_lr.parameters():
        rates.data = 0.1 + 0.4 * torch.rand(rates.shape, generator=generator).double()
    return datamodule, module


def both(module, temperature=1.0):
    return OnlineSampler(module, temperature, "weights"), OnlineSampler(
        module, temperature, "lowrank"
    )


def assert_same_results(a, b):
    assert torch.equal(a.mask, b.mask)
    assert torch.equal(a.y, b.y)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("case", list(CASES))
def test_lowrank_path_draws_what_the_weights_path_draws(tmp_path, case):
    datamodule, module = module_of(tmp_path, CASES[case])
    spec = module.task_spec
    assert sampling_path(module) == "lowrank"  # auto, for a module on engine=lowrank
    weights, lowrank = both(module)
    assert (weights.path, lowrank.path) == ("weights", "lowrank")
    datamodule.setup("test")
    batch = next(iter(datamodule.test_dataloader()))
    coords = spec.element_coordinates(batch.support_x)
    n = batch.num_tasks

    # teacher forcing: the engine's online losses on both paths
    with torch.enable_grad():
        expected = module.adapt(batch, "none", module.eval_schedule).element_losses
    fed = [s.feed(coords, batch.support_y, batch.support_mask) for s in (weights, lowrank)]
    assert_same_results(*fed)
    for result in fed:
        torch.testing.assert_close(result.element_losses(spec), expected, rtol=1e-10, atol=1e-12)
    for name, p in fed[0].params.items():  # the adapted parameters, made on use
        torch.testing.assert_close(fed[1].params[name], p, rtol=1e-9, atol=1e-11)

    # generation: the same draws from the same seed
    runs = []
    for sampler in (weights, lowrank):
        stop = END_TOKEN if spec.kind == "text" else None
        runs.append(
            sampler.run(coords, generator=torch.Generator().manual_seed(3), stop_token=stop)
        )
    assert_same_results(*runs)
    assert runs[0].mask.sum() > n  # more than one element per sample was drawn

    # conditioning: a prompt, or completion from known pixels (fed first, any order)
    if spec.kind == "text":
        texts = [
            generate_text(module, 3, 1.0, torch.Generator().manual_seed(4), "Th", path)
            for path in ("weights", "lowrank")
        ]
        assert texts[0] == texts[1] and all(t.startswith("Th") for t in texts[1])
    else:
        side = int(spec.input_sizes[0])
        images = datamodule.bits["test"][:n].reshape(n, side, side)
        generator = torch.Generator().manual_seed(5)
        known = completion_mask("random", n, side, side, 0.4, generator)
        order = datamodule.order_for(n, generator)
        done = [
            complete_images(module, images, known, 1.0, torch.Generator().manual_seed(6), order, p)
            for p in ("weights", "lowrank")
        ]
        assert torch.equal(done[0], done[1])
        assert torch.equal(done[1][known], images[known].to(done[1].dtype))


def test_lowrank_path_folds_long_histories(tmp_path):
    """Wide layers over many steps: the history is folded into dense per-sample deltas
    (engine.fold=always: at every step) and the draws stay those of the weights path."""
    _, module = module_of(tmp_path, [*DIGITS, *MLP, "engine.fold=always"])
    weights, lowrank = both(module)
    x = torch.cartesian_prod(torch.arange(8), torch.arange(8)).expand(3, -1, -1)
    runs = [s.run(x, generator=torch.Generator().manual_seed(0)) for s in (weights, lowrank)]
    assert_same_results(*runs)
    images = generate_images(module, 3, 1.0, torch.Generator().manual_seed(0), path="lowrank")
    assert torch.equal(images.reshape(3, -1), runs[0].y)
    # the engine's online run the path steps: it folded, and teacher-forced it gives the
    # engine's own online losses
    state = OnlineRun(
        module.engine, module.model, x, module.loss_fn, module.inner_lr, module.train_schedule
    )
    y, mask = runs[0].y, torch.ones(3, 64, dtype=torch.bool)
    losses = torch.cat(
        [state.step(i, x[:, i : i + 1], y[:, i : i + 1], mask[:, :1]) for i in range(64)], 1
    )
    assert state.num_steps == 64 and state.folds > 0
    torch.testing.assert_close(
        losses, runs[0].element_losses(module.task_spec), rtol=1e-10, atol=1e-12
    )
    batch = TaskBatch(support_x=x, support_y=y)
    with torch.enable_grad():
        expected = module.adapt(batch, "none", module.eval_schedule).element_losses
    torch.testing.assert_close(losses, expected, rtol=1e-10, atol=1e-12)


def test_auto_path_and_refusals(tmp_path):
    # a module trained on another engine samples on the lowrank path too (same samples)
    _, functional = module_of(tmp_path, [*DIGITS, *MLP, "engine=functional"])
    assert sampling_path(functional) == "lowrank"
    assert OnlineSampler(functional, path="weights").path == "weights"
    with pytest.raises(SamplingError, match="path='dense'; allowed: auto, weights, lowrank"):
        OnlineSampler(functional, path="dense")
    # per-parameter rates do not factor out of the low-rank update: auto takes weights
    _, per_parameter = module_of(
        tmp_path, [*DIGITS, *MLP, "engine=functional", "algorithm.inner_lr_learned=per_parameter"]
    )
    assert OnlineSampler(per_parameter).path == "weights"
    with pytest.raises(SamplingError, match="per-parameter rate matrix.*path=weights"):
        OnlineSampler(per_parameter, path="lowrank")
    # inner momentum: the velocity is not a rank-one history (auto takes weights)
    _, momentum = module_of(
        tmp_path, [*DIGITS, *MLP, "engine=functional", "algorithm.inner_momentum=0.5"]
    )
    assert OnlineSampler(momentum).path == "weights"
    with pytest.raises(SamplingError, match="inner_momentum=0.5.*path=weights"):
        OnlineSampler(momentum, path="lowrank")
    # prev_input with several elements per step: draws within a step are inputs
    _, batched = module_of(
        tmp_path, [*TEXT, *MLP, "task.prev_input=true", "algorithm.inner_batch_size=4"]
    )
    assert OnlineSampler(batched).path == "weights"
    with pytest.raises(SamplingError, match="inner_batch_size=4 each draw.*path=weights"):
        OnlineSampler(batched, path="lowrank")
    # the lowrank path starts from the initial parameters; auto continues on weights
    _, module = module_of(tmp_path, [*DIGITS, *MLP])
    x = torch.zeros(2, 3, 2, dtype=torch.long)
    fed = OnlineSampler(module).feed(x, torch.ones(2, 3))
    with pytest.raises(SamplingError, match="path='weights'"):
        OnlineSampler(module, path="lowrank").run(x, params=fed.params)
    rest = [
        OnlineSampler(module, path=p).run(
            x, params=fed.params, generator=torch.Generator().manual_seed(0)
        )
        for p in ("auto", "weights")
    ]
    assert_same_results(*rest)


def test_a_diverging_lowrank_sample_stops_with_the_element_and_samples(tmp_path):
    from reptile_gen.inner_loop.core.guard import Diverged

    _, module = module_of(tmp_path, [*DIGITS, *MLP])
    with torch.no_grad():
        module.inner_lr.init = 1e200  # float64: overflows after a step or two
    x = torch.cartesian_prod(torch.arange(8), torch.arange(8)).expand(3, -1, -1)
    with pytest.raises(Diverged, match=r"non-finite prediction while sampling; at element \d+"):
        OnlineSampler(module, path="lowrank").run(x, generator=torch.Generator().manual_seed(0))
