"""The autoregressive LSTM baseline (``algorithm=lstm``): its NLL is the step-by-step
likelihood, padding changes nothing, it trains through the real ``train()`` on the
sequence tasks with the meta-learners' metrics, it learns, and nonsense combinations are
clear errors before training."""

from __future__ import annotations

import json

import pytest
import torch

from reptile_gen.algorithms import LSTMBaseline, LSTMNetwork
from reptile_gen.data.task_batch import TaskBatch
from reptile_gen.data.task_spec import TaskSpec
from reptile_gen.train import train
from reptile_gen.utils.instantiate import build_run
from reptile_gen.utils.runtime import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

#: a small LSTM, so every run here takes seconds
SMALL = ["algorithm.hidden_size=16", "algorithm.num_layers=2", "algorithm.embedding_dim=8"]

TEXT_SPEC = TaskSpec(
    "discrete", "classes", input_sizes=(12,), output_dim=7, name="text", sequential=True
)
IMAGE_SPEC = TaskSpec("discrete", "bits", input_sizes=(3, 3), name="digits", sequential=True)


def _module(spec: TaskSpec) -> LSTMBaseline:
    torch.manual_seed(0)
    module = LSTMBaseline(None, spec, hidden_size=5, num_layers=2, embedding_dim=3)
    return module.double()


def _text_batch(lengths, max_len: int = 12, seed: int = 0) -> TaskBatch:
    generator = torch.Generator().manual_seed(seed)
    n = len(lengths)
    y = torch.randint(0, 7, (n, max_len), generator=generator)
    mask = torch.arange(max_len).expand(n, -1) < torch.tensor(lengths).unsqueeze(1)
    return TaskBatch(support_x=torch.arange(max_len).expand(n, -1), support_y=y, support_mask=mask)


def _image_batch(n: int = 3, seed: int = 0) -> TaskBatch:
    generator = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(9, generator=generator) for _ in range(n)])
    coords = torch.stack([order // 3, order % 3], dim=-1)
    bits = torch.randint(0, 2, (n, 9), generator=generator).double()
    return TaskBatch(support_x=coords, support_y=bits)


def _step_by_step_nll(module: LSTMBaseline, batch: TaskBatch) -> torch.Tensor:
    """Each sequence's NLL by running the network one position at a time, feeding back
    the previous target (the start token first) and carrying the state by hand."""
    net, spec = module.model, module.task_spec
    n, length = batch.support_mask.shape
    state = None
    prev = torch.full((n, 1), net.start_token, dtype=torch.long)
    total = torch.zeros(n, dtype=torch.float64)
    for i in range(length):
        pred, state = net(batch.support_x[:, i : i + 1], prev, state)
        loss = spec.elementwise_loss(pred, batch.support_y[:, i : i + 1])[:, 0]
        total = total + torch.where(batch.support_mask[:, i], loss, torch.zeros_like(loss))
        prev = batch.support_y[:, i : i + 1].long()
    return total


# ---------------------------------------------------------------------- the likelihood
@pytest.mark.parametrize("kind", ["text", "image"])
def test_nll_equals_the_step_by_step_loop(kind):
    spec = TEXT_SPEC if kind == "text" else IMAGE_SPEC
    module = _module(spec)
    batch = _text_batch([12, 5, 1]) if kind == "text" else _image_batch()
    scored = module.evaluate_batch(batch)
    assert scored.shape == (batch.num_tasks, 2) and scored.dtype == torch.float64
    expected = _step_by_step_nll(module, batch)
    torch.testing.assert_close(scored[:, 0], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scored[:, 1], batch.support_mask.sum(1).double())
    # the training loss: summed NLL over real elements / their number
    loss, _ = module.meta_loss(batch)
    torch.testing.assert_close(loss, expected.sum() / batch.support_mask.sum())


def test_padding_changes_nothing():
    module = _module(TEXT_SPEC)
    padded = _text_batch([4, 12, 7], seed=1)
    # the same sequences with other garbage in the padding, and each one alone, unpadded
    garbage = padded.support_y.clone()
    garbage[~padded.support_mask] = (garbage[~padded.support_mask] + 3) % 7
    other = TaskBatch(padded.support_x, garbage, padded.support_mask)
    alone = torch.stack(
        [
            module.evaluate_batch(
                TaskBatch(
                    padded.support_x[i : i + 1, :length],
                    padded.support_y[i : i + 1, :length],
                )
            )[0]
            for i, length in enumerate([4, 12, 7])
        ]
    )
    torch.testing.assert_close(module.evaluate_batch(padded), alone, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(module.evaluate_batch(other), alone, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        module.meta_loss(padded)[0], alone[:, 0].sum() / alone[:, 1].sum(), rtol=1e-12, atol=0
    )


def test_start_token_and_vocabulary():
    assert LSTMNetwork(IMAGE_SPEC, 4, 1, 2).prev_embedding.num_embeddings == 3
    net = LSTMNetwork(TEXT_SPEC, 4, 1, 2)
    assert net.prev_embedding.num_embeddings == 8 and net.start_token == 7
    prev = net.previous_tokens(torch.tensor([[3, 1, 4]]))
    assert prev.tolist() == [[7, 3, 1]]


def test_random_init_baseline_copies_the_lstm(make_cfg):
    cfg = make_cfg(["algorithm=lstm", "task=digits", *SMALL])
    datamodule, module = build_run(cfg)
    assert isinstance(module.model, LSTMNetwork)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(1.0)  # as if trained
    random_model = module._random_init_model()
    assert isinstance(random_model, LSTMNetwork) and random_model is not module.model
    assert all(
        torch.equal(random_model.state_dict()[k], v) for k, v in module._initial_state.items()
    )
    batch = datamodule.sample(torch.Generator().manual_seed(0), 2)
    assert not torch.equal(
        module.evaluate_batch(batch), module.evaluate_batch(batch, model=random_model)
    )


# ---------------------------------------------------------------------- real training runs
@pytest.mark.parametrize(
    ("task", "metric"),
    [
        (["task=digits"], "nll_bits_per_pixel"),
        (["task=text", "task.max_len=16"], "nll_bits_per_char"),
    ],
    ids=["digits", "text"],
)
def test_train_writes_the_meta_learners_metrics(make_cfg, tmp_path, task, metric):
    metrics = train(make_cfg(["algorithm=lstm", *task, *SMALL]))
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for prefix in ("test", "test/random_init"):
        assert 0 < saved[f"{prefix}/{metric}"] < 20, saved
        assert saved[f"{prefix}/num_sequences"] == 4
    assert saved[f"test/{metric}"] == metrics[f"test/{metric}"]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_learns_digits_beyond_the_random_init(make_cfg, tmp_path):
    cfg = make_cfg(
        [
            "algorithm=lstm",
            "task=digits",
            *SMALL,
            "algorithm.hidden_size=32",
            "algorithm.num_layers=1",
            "algorithm.optimizer.lr=0.01",
            "trainer.max_steps=300",
            "trainer.val_check_interval=300",
            "task.meta_batch_size=16",
            "task.num_test_tasks=64",
            "task.eval_batch_size=64",
        ]
    )
    train(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    trained = saved["test/nll_bits_per_pixel"]
    untrained = saved["test/random_init/nll_bits_per_pixel"]
    assert trained < 0.75 * untrained, (trained, untrained)


def test_float64_run(make_cfg):
    metrics = train(
        make_cfg(["algorithm=lstm", "task=digits", *SMALL, "trainer.precision=64-true"])
    )
    assert metrics["test/nll_bits_per_pixel"] == metrics["test/nll_bits_per_pixel"]  # not NaN


# ---------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (
            ["task=sine"],
            ValueError,
            r"algorithm=lstm with task 'sine'.*allowed tasks: text, mnist, digits",
        ),
        (
            ["+algorithm.inner_lr_learned=scalar"],
            ConfigError,
            r"algorithm.inner_lr_learned='scalar' with LSTM:.*allowed: none",
        ),
        (
            ["+algorithm.inner_lr=0.001"],
            ConfigError,
            r"algorithm.inner_lr=0.001 with LSTM:.*no inner loop",
        ),
        (["algorithm.hidden_size=0"], ValueError, r"algorithm.hidden_size=0; must be"),
        (["algorithm.dropout=1.5"], ValueError, r"algorithm.dropout=1.5; must be"),
    ],
    ids=["sine", "learned-lr", "inner-lr", "hidden-size", "dropout"],
)
def test_nonsense_is_a_clear_error_before_training(make_cfg, tmp_path, overrides, error, message):
    task = [] if any(o.startswith("task=") for o in overrides) else ["task=digits"]
    cfg = make_cfg(["algorithm=lstm", *task, *SMALL, *overrides])
    with pytest.raises(error, match=message):
        train(cfg)
    run_dir = tmp_path / "run"
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.json").exists()
