"""The online objective of sequence tasks (SGD as a sequence model), in float64.

* the engines' ``element_losses`` under the online schedule are the online negative
  log-likelihood of a hand-written loop: for each element (or group of
  ``inner_batch_size`` elements), its loss at the current weights, then one plain SGD
  step on it, with ``torch.autograd`` on a fresh copy of the model;
* trailing padding changes nothing: the NLL, the adapted weights and the meta-gradients
  of MAML, first-order MAML and Reptile;
* with a stateful inner optimizer (Adam, ``higher`` engine) a step made only of padding is
  skipped, not taken with a zero loss (which would still move the weights and advance
  Adam's moments and step count);
* ``objective=auto`` is the online objective for sequence tasks, and asking a sequence
  task for the query objective is a clear error.
"""

from __future__ import annotations

import copy
import functools
import re

import pytest
import torch

from reptile_gen.algorithms import FOMAML, MAML, Reptile
from reptile_gen.data.task_batch import TaskBatch
from reptile_gen.data.task_spec import TaskSpec
from reptile_gen.inner_loop import InnerLR, InnerSchedule, make_engine
from reptile_gen.models import MLP, LSTMBlockStack, build_model
from reptile_gen.utils.instantiate import build_run

DTYPE = torch.float64
LR = 0.3

#: like text: one integer coordinate (the position), a class (the byte) per element
CLASSES = TaskSpec(
    "discrete", "classes", input_sizes=(9,), output_dim=6, name="toy_text", sequential=True
)
#: like binarized images: two coordinates (row, col), one bit per element
BITS = TaskSpec("discrete", "bits", input_sizes=(3, 3), name="toy_image", sequential=True)
SPECS = {"classes": CLASSES, "bits": BITS}

BODIES = {
    "mlp": functools.partial(MLP, hidden_sizes=[6, 5], activation="tanh"),
    "lstm_block": functools.partial(LSTMBlockStack, hidden_sizes=[5, 4]),
}
#: Adam's (beta1, beta2, eps) in the Adam tests
ADAM = (0.8, 0.9, 1e-8)
ENGINES = {"functional": make_engine("functional"), "higher": make_engine("higher")}

#: two tasks of 9 elements; task 1 ends after 5 (its last 4 elements are padding)
LENGTHS = [9, 5]


def make_model(spec: TaskSpec, body: str = "mlp", seed: int = 0):
    torch.manual_seed(seed)
    return build_model(spec, BODIES[body], embedding_dim=3).double()


def make_lr(model, learned: str = "none", init: float = LR) -> InnerLR:
    return InnerLR([(n, p.shape) for n, p in model.named_parameters()], init, learned).double()


def make_batch(spec: TaskSpec, lengths=LENGTHS, length: int | None = None, seed: int = 1):
    """Sequences as the sequence DataModules build them: text-like tasks get positions
    ``[B, S]`` as inputs, image-like ones ``(row, col)`` pairs ``[B, S, 2]`` in a random
    order; every element past a task's length is junk with a False mask."""
    g = torch.Generator().manual_seed(seed)
    num_tasks = len(lengths)
    length = length or max(lengths)
    if spec is CLASSES:
        x = torch.arange(length).expand(num_tasks, -1).clone()
        y = torch.randint(0, spec.output_dim, (num_tasks, length), generator=g)
    else:
        side = spec.input_sizes[0]
        cells = torch.stack([torch.randperm(side * side, generator=g) for _ in lengths])
        cells = cells.repeat(1, -(-length // (side * side)))[:, :length]
        x = torch.stack([cells // side, cells % side], dim=-1)
        y = torch.randint(0, 2, (num_tasks, length), generator=g).to(DTYPE)
    mask = torch.zeros(num_tasks, length, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    return TaskBatch(support_x=x, support_y=y, support_mask=mask)


def pad_batch(batch: TaskBatch, extra: int, seed: int = 5) -> TaskBatch:
    """``batch`` with ``extra`` more trailing elements of random junk, all masked out."""
    g = torch.Generator().manual_seed(seed)
    x, y, m = batch.support_x, batch.support_y, batch.support_mask
    junk_x = torch.randint(0, 3, (x.shape[0], extra, *x.shape[2:]), generator=g)
    junk_y = torch.randint(0, 2, (y.shape[0], extra), generator=g).to(y.dtype)
    return TaskBatch(
        support_x=torch.cat([x, junk_x], 1),
        support_y=torch.cat([y, junk_y], 1),
        support_mask=torch.cat([m, torch.zeros(m.shape[0], extra, dtype=torch.bool)], 1),
    )


def hand_online_loop(model, spec, batch, lr, inner_batch_size, adam=None, step_on_padding=False):
    """The reference: each task on a fresh copy of the model, elements in order; each
    group of ``inner_batch_size`` elements is scored at the current weights (those losses
    are the online NLL), then one step on the group's mean loss. Padding elements are
    dropped; a group with no real element takes no step. ``adam``: None for
    ``p -= lr * grad``, else ``(beta1, beta2, eps)`` of Adam in the form of Kingma & Ba's
    Algorithm 1 with the bias corrections folded into the step size (the form ``higher``
    differentiates: ``eps`` is added to ``sqrt(v)``, not to the bias-corrected one).
    ``step_on_padding``: the wrong behaviour, a step with zero gradients on a group
    made only of padding.

    Returns ``([B, S] element losses (0 on padding), {name: [B, ...] adapted weights})``.
    """
    names = [n for n, _ in model.named_parameters()]
    ncoords = len(spec.input_sizes)
    all_losses, adapted = [], {n: [] for n in names}
    for b in range(batch.num_tasks):
        net = copy.deepcopy(model)
        moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in net.parameters()]
        taken = 0
        losses = torch.zeros(batch.support_x.shape[1], dtype=DTYPE)
        for start in range(0, batch.support_x.shape[1], inner_batch_size):
            index = [
                i
                for i in range(start, min(start + inner_batch_size, batch.support_x.shape[1]))
                if batch.support_mask[b, i]
            ]
            if index:
                x = batch.support_x[b, index].reshape(len(index), ncoords)
                elements = spec.elementwise_loss(net(x), batch.support_y[b, index])
                assert elements.shape == (len(index),)
                losses[index] = elements.detach()
                grads = torch.autograd.grad(elements.mean(), list(net.parameters()))
            elif step_on_padding:
                grads = [torch.zeros_like(p) for p in net.parameters()]
            else:
                continue
            taken += 1
            with torch.no_grad():
                for p, g, (m, v) in zip(net.parameters(), grads, moments):
                    if adam is None:
                        p -= lr * g
                        continue
                    beta1, beta2, eps = adam
                    m.mul_(beta1).add_((1 - beta1) * g)
                    v.mul_(beta2).add_((1 - beta2) * g * g)
                    step = lr * (1 - beta2**taken) ** 0.5 / (1 - beta1**taken)
                    p -= step * m / (v.sqrt() + eps)
        all_losses.append(losses)
        for n, p in net.named_parameters():
            adapted[n].append(p.detach())
    return torch.stack(all_losses), {n: torch.stack(v) for n, v in adapted.items()}


def run_engine(engine, model, spec, batch, lr, schedule, grad_mode="none"):
    with torch.enable_grad():
        return engine.run(
            model, batch, spec.elementwise_loss, lr, schedule, grad_mode, return_adapted=True
        )


def close(actual, expected, what=""):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what}{m}")


# ------------------------------------------------------------ online NLL vs a hand loop
@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("body", list(BODIES))
@pytest.mark.parametrize("inner_batch_size", [1, 3])
@pytest.mark.parametrize("engine", list(ENGINES))
def test_online_nll_equals_hand_written_sequential_sgd(engine, inner_batch_size, body, spec):
    spec_ = SPECS[spec]
    model = make_model(spec_, body)
    batch = make_batch(spec_)
    lr = make_lr(model)
    schedule = InnerSchedule(None, inner_batch_size)
    result = run_engine(ENGINES[engine], model, spec_, batch, lr, schedule)
    losses, adapted = hand_online_loop(model, spec_, batch, LR, inner_batch_size)

    assert result.element_losses.shape == batch.support_mask.shape
    close(result.element_losses, losses, "element losses: ")
    assert (result.element_losses[~batch.support_mask] == 0).all()
    assert (losses[batch.support_mask] > 0).all()
    close(result.element_losses.sum(1), losses.sum(1), "online NLL per sequence: ")
    for name, phi in adapted.items():
        close(result.adapted[name], phi, f"adapted {name}: ")
    # the weights did move along the sequence (a real test of the updates)
    theta = dict(model.named_parameters())
    assert any((adapted[n] - theta[n].detach()).abs().max() > 1e-3 for n in adapted)
    # each step's loss is the mean over its real elements
    steps = schedule.slices(batch.support_x.shape[1])
    for b in range(batch.num_tasks):
        for i, (s, e) in enumerate(steps):
            real = batch.support_mask[b, s:e]
            expected = losses[b, s:e][real].mean() if real.any() else torch.zeros((), dtype=DTYPE)
            close(result.step_losses[b, i], expected, f"step loss {b},{i}: ")


@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("inner_batch_size", [1, 3])
def test_meta_learner_online_objective_is_nll_per_real_element(inner_batch_size, spec):
    """The MetaLearner's objective on a sequence task (``objective=auto``): the summed
    online NLL divided by the number of real elements in the batch."""
    spec_ = SPECS[spec]
    model = make_model(spec_)
    module = MAML(model, spec_, inner_lr=LR, inner_batch_size=inner_batch_size).double()
    assert module.objective == "online"
    assert module.train_schedule == InnerSchedule(None, inner_batch_size)
    batch = make_batch(spec_)
    loss, _ = module.meta_loss(batch)
    losses, _ = hand_online_loop(model, spec_, batch, LR, inner_batch_size)
    close(loss.detach(), losses.sum() / batch.support_mask.sum(), "objective: ")
    # evaluation reports the same NLL per sequence and its number of real elements
    out = module.evaluate_batch(batch)
    close(out[:, 0], losses.sum(1), "eval NLL: ")
    assert out[:, 1].tolist() == [float(n) for n in LENGTHS]


# ------------------------------------------------------------------------------ padding
@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("inner_batch_size", [1, 3])
def test_trailing_padding_changes_no_nll_and_no_adapted_weights(inner_batch_size, engine):
    spec = CLASSES
    model = make_model(spec, "lstm_block")
    batch = make_batch(spec)
    lr = make_lr(model, "per_tensor")
    schedule = InnerSchedule(None, inner_batch_size)
    plain = run_engine(ENGINES[engine], model, spec, batch, lr, schedule)
    s = batch.support_x.shape[1]
    for extra, seed in ((4, 5), (4, 6), (7, 7)):  # different junk, different lengths
        padded = run_engine(
            ENGINES[engine], model, spec, pad_batch(batch, extra, seed), lr, schedule
        )
        close(padded.element_losses[:, :s], plain.element_losses, "element losses: ")
        assert (padded.element_losses[:, s:] == 0).all()
        for name, phi in plain.adapted.items():
            close(padded.adapted[name], phi, f"adapted {name}: ")


def _module(algorithm: str, spec, engine: str, seed: int = 0):
    model = make_model(spec, "mlp", seed)
    common = {"inner_lr": LR, "engine": {"name": engine}, "inner_batch_size": 2}
    if algorithm == "maml":
        return MAML(model, spec, inner_lr_learned="scalar", **common).double()
    if algorithm == "fomaml":
        return FOMAML(model, spec, inner_lr_learned="per_tensor", **common).double()
    return Reptile(model, spec, **common).double()


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile"])
def test_trailing_padding_changes_no_meta_gradient(algorithm, engine):
    """The meta-loss and its gradient (initial weights and learned inner rates) of a batch
    and of the same batch with junk padding appended are identical."""
    spec = BITS
    batch = make_batch(spec)
    values, grads = [], []
    for b in (batch, pad_batch(batch, 4), pad_batch(batch, 6, seed=9)):
        module = _module(algorithm, spec, engine)
        assert module.objective == "online"
        loss, logs = module.meta_loss(b)
        params = list(module.parameters())
        g = torch.autograd.grad(loss, params, allow_unused=True)
        values.append((loss.detach(), logs.get("online_loss")))
        grads.append([torch.zeros_like(p) if x is None else x for p, x in zip(params, g)])
    for (v, o), g in zip(values[1:], grads[1:]):
        close(v, values[0][0], "meta-loss: ")
        if o is not None:
            close(o, values[0][1], "online loss: ")
        for i, (x, y) in enumerate(zip(g, grads[0])):
            close(x, y, f"meta-gradient {i}: ")
    assert max(float(x.abs().max()) for x in grads[0]) > 1e-4
    if algorithm != "reptile":  # the learned inner rate gets a gradient too
        assert float(grads[0][-1].abs().max()) > 0


# --------------------------------------------------------------- stateful inner optimizer
@pytest.mark.parametrize("inner_batch_size", [1, 2])
def test_adam_inner_loop_skips_steps_made_of_padding(inner_batch_size):
    """Task 1 ends after 5 elements: with Adam, its padded run (steps of pure padding at
    the end) adapts to exactly the weights of its unpadded run and of a hand-written
    Adam loop that takes no step there."""
    spec = CLASSES
    model = make_model(spec)
    lr = make_lr(model, init=0.05)
    engine = make_engine("higher", {"name": "adam", "betas": ADAM[:2], "eps": ADAM[2]})
    schedule = InnerSchedule(None, inner_batch_size)
    batch = make_batch(spec)  # lengths [9, 5]
    padded = run_engine(engine, model, spec, pad_batch(batch, 3), lr, schedule)
    alone = TaskBatch(batch.support_x[1:, :5], batch.support_y[1:, :5], batch.support_mask[1:, :5])
    unpadded = run_engine(engine, model, spec, alone, lr, schedule)
    losses, reference = hand_online_loop(model, spec, batch, 0.05, inner_batch_size, ADAM)
    close(padded.element_losses[:, :9], losses, "element losses: ")
    for name, phi in padded.adapted.items():
        close(phi[1], unpadded.adapted[name][0], f"{name} (padded vs unpadded): ")
        close(phi, reference[name], f"{name} (vs hand-written Adam): ")

    # the test has teeth: taking the padding steps with a zero gradient would still move
    # the weights (Adam's momentum) and advance its step count
    _, zero_steps = hand_online_loop(
        model, spec, batch, 0.05, inner_batch_size, ADAM, step_on_padding=True
    )
    moved = max(
        float((zero_steps[n][1] - padded.adapted[n][1].detach()).abs().max()) for n in reference
    )
    assert moved > 1e-4


@pytest.mark.parametrize("grad_mode", ["second_order", "first_order"])
def test_adam_inner_loop_padding_changes_no_meta_gradient(grad_mode):
    spec = BITS
    model = make_model(spec)
    lr = make_lr(model, init=0.05)
    engine = make_engine("higher", {"name": "adam"})
    schedule = InnerSchedule(None, 1)
    batch = make_batch(spec, lengths=[6, 4])
    grads = []
    for b in (batch, pad_batch(batch, 3)):
        result = engine.run(model, b, spec.elementwise_loss, lr, schedule, grad_mode)
        grads.append(torch.autograd.grad(result.element_losses.sum(), list(model.parameters())))
    for i, (x, y) in enumerate(zip(*grads)):
        close(x, y, f"{grad_mode} meta-gradient {i}: ")


# ------------------------------------------------------------------- objective by config
@pytest.mark.parametrize(
    "task,algorithm,objective",
    [
        ("text", "maml", "online"),
        ("digits", "fomaml", "online"),
        ("text", "reptile", "online"),
        ("sine", "maml", "query"),
    ],
)
def test_objective_auto_is_online_for_sequence_tasks(make_cfg, task, algorithm, objective):
    cfg = make_cfg([f"task={task}", f"algorithm={algorithm}"])
    assert cfg.algorithm.objective == "auto"
    datamodule, module = build_run(cfg)
    assert module.objective == objective
    assert module.is_sequence_model == (objective == "online")
    if objective == "online":
        assert datamodule.spec.sequential
        assert module.train_schedule == InnerSchedule(None, cfg.algorithm.inner_batch_size)


@pytest.mark.parametrize("task", ["text"])
def test_query_objective_with_a_sequence_task_is_a_clear_error(make_cfg, task):
    cfg = make_cfg([f"task={task}", "algorithm.objective=query"])
    message = (
        f"algorithm.objective=query with task {task!r}: a sequence task has no query set; "
        "allowed: online (or auto)"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        build_run(cfg)


def test_query_objective_with_a_sequence_spec_is_refused_by_the_module():
    with pytest.raises(ValueError, match="algorithm.objective=query with task 'toy_text'"):
        MAML(make_model(CLASSES), CLASSES, objective="query")
