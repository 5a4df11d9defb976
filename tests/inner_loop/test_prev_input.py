"""``task.prev_input``: the input of element ``i`` is ``(x_i, y_{i-1})``, float64.

The previous target is one more embedded coordinate, so every engine runs it unchanged:
each engine's online losses, adapted weights and meta-gradients (every mode it has) equal
the generic ``torch.func`` path's with the option on, the exact second-order gradient
equals a finite difference, and no element's prediction sees its own target or a later
one (perturbing ``y_i`` and later leaves the online losses before ``i`` unchanged, and the
losses of element ``i`` over every value of ``y_i`` form a normalised distribution).
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import ONLINE_1, ONLINE_2, assert_all_close, directional_fd, make_model, meta_grads

from reptile_gen.data.task_batch import TaskBatch
from reptile_gen.data.task_spec import TaskSpec
from reptile_gen.inner_loop import FunctionalEngine, InnerLR, make_engine
from reptile_gen.models import MLP, GatedMLP, LSTMBlockStack

#: text-like (one position coordinate, 5 classes) and image-like (row, col; bits)
SPECS = {
    "classes": TaskSpec(
        "discrete", "classes", input_sizes=(7,), output_dim=5, sequential=True, prev_input=True
    ),
    "bits": TaskSpec("discrete", "bits", input_sizes=(3, 3), sequential=True, prev_input=True),
}
BODIES = {
    "mlp_tanh": functools.partial(MLP, hidden_sizes=[5, 4], activation="tanh"),
    "gated_mlp": functools.partial(GatedMLP, hidden_sizes=[5]),
    "lstm_block": functools.partial(LSTMBlockStack, hidden_sizes=[4]),
}
ENGINES = {
    "functional": lambda: make_engine("functional"),
    "functional_autograd_graph": lambda: FunctionalEngine(hand_backward=False),
    "lowrank": lambda: make_engine("lowrank"),
    "higher": lambda: make_engine("higher"),
}
MODES = ("none", "first_order", "second_order")
LENGTHS = [6, 3, 5]


def targets(spec: TaskSpec, num_tasks: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if spec.output_kind == "bits":
        return torch.randint(0, 2, (num_tasks, n), generator=g).double()
    return torch.randint(0, spec.output_dim, (num_tasks, n), generator=g)


def coordinates(spec: TaskSpec, num_tasks: int, n: int) -> torch.Tensor:
    """Each task's elements in a different order of the grid (as pixel_order=random)."""
    g = torch.Generator().manual_seed(3)
    if len(spec.input_sizes) == 1:
        return torch.stack([torch.arange(n) for _ in range(num_tasks)])
    rows, cols = spec.input_sizes
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1)
    grid = grid.reshape(-1, 2)
    return torch.stack([grid[torch.randperm(rows * cols, generator=g)[:n]] for _ in range(3)])


def batch_of(spec: TaskSpec, y: torch.Tensor, lengths=LENGTHS) -> TaskBatch:
    """A padded batch whose inputs carry the previous targets, built as the data modules
    build theirs (:meth:`TaskSpec.model_inputs`)."""
    num_tasks, n = y.shape
    x = coordinates(spec, num_tasks, n)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    return TaskBatch(spec.model_inputs(x, y), y, mask)


def setup(kind: str, body: str):
    spec = SPECS[kind]
    model = make_model(spec, body=BODIES[body])
    lr = InnerLR([(n, p.shape) for n, p in model.named_parameters()], 0.05, "per_tensor")
    return spec, model, lr.double(), batch_of(spec, targets(spec, 3, 6, seed=1))


def test_inputs_carry_the_previous_target_and_the_encoder_has_a_table_for_it():
    spec = SPECS["bits"]
    y = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    x = coordinates(spec, 3, 4)[:1]
    inputs = spec.model_inputs(x, y)
    assert inputs.shape == (1, 4, 3) and torch.equal(inputs[..., :2], x)
    assert inputs[0, :, 2].tolist() == [spec.start_token, 1, 0, 1] and spec.start_token == 2
    assert torch.equal(spec.element_coordinates(inputs), x)
    text = SPECS["classes"]
    positions = torch.arange(4)[None]
    assert text.model_inputs(positions, torch.tensor([[4, 0, 3, 1]]))[0].tolist() == [
        [0, 5],
        [1, 4],
        [2, 0],
        [3, 3],
    ]
    model = make_model(text)
    assert model.encoder.sizes == (7, 6)  # positions, then 5 classes + the start token
    off = TaskSpec("discrete", "bits", input_sizes=(3, 3), sequential=True)
    assert off.model_inputs(x, y) is x and off.encoder_sizes == (3, 3)


@pytest.mark.parametrize(
    "spec",
    [
        dict(input_kind="continuous", output_kind="real", sequential=True),
        dict(input_kind="discrete", output_kind="classes", input_sizes=(4,), output_dim=3),
    ],
    ids=["real-targets", "not-a-sequence"],
)
def test_prev_input_is_refused_where_it_means_nothing(spec):
    with pytest.raises(ValueError, match=r"^task\.prev_input=true"):
        TaskSpec(**spec, prev_input=True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("body", list(BODIES))
@pytest.mark.parametrize("kind", list(SPECS))
@pytest.mark.parametrize("engine", list(ENGINES))
def test_engines_agree_with_the_previous_target_as_input(engine, kind, body, mode):
    """Losses, adapted weights (Reptile) and meta-gradients (first and second order)
    equal the generic path's, two elements per inner step (both predicted by the same
    parameters, the second's input carrying the first's target)."""
    spec, model, lr, batch = setup(kind, body)
    ours, reference = ENGINES[engine](), FunctionalEngine(path="vmap_grad")
    tol = {"rtol": 1e-10, "atol": 1e-12}
    if mode == "none":
        with torch.enable_grad():
            kw = {"return_adapted": True}
            a = ours.run(model, batch, spec.elementwise_loss, lr, ONLINE_2, "none", **kw)
            b = reference.run(model, batch, spec.elementwise_loss, lr, ONLINE_2, "none", **kw)
        torch.testing.assert_close(a.element_losses, b.element_losses, **tol)
        mean_a, mean_b = a.mean_adapted(), b.mean_adapted()
        assert_all_close(list(mean_a.values()), list(mean_b.values()), what="mean", **tol)
        return
    va, ga = meta_grads(ours, model, batch, lr, ONLINE_2, "online", mode, spec)
    vb, gb = meta_grads(reference, model, batch, lr, ONLINE_2, "online", mode, spec)
    torch.testing.assert_close(va, vb, **tol)
    assert_all_close(ga, gb, what=f"{engine} {mode} {body} {kind}", **tol)
    # the previous-target table gets a meta-gradient like every other parameter
    prev_table = dict(model.named_parameters())[f"encoder.tables.{len(spec.input_sizes)}.weight"]
    index = [i for i, p in enumerate(model.parameters()) if p is prev_table][0]
    assert ga[index].abs().sum() > 0


@pytest.mark.parametrize("kind", list(SPECS))
def test_second_order_gradient_matches_finite_differences(kind):
    spec, model, lr, batch = setup(kind, "mlp_tanh")
    engine = make_engine("lowrank")
    _, exact = meta_grads(engine, model, batch, lr, ONLINE_1, "online", "second_order", spec)
    params = list(model.parameters()) + list(lr.parameters())
    g = torch.Generator().manual_seed(7)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]

    def value():
        result = engine.run(model, batch, spec.elementwise_loss, lr, ONLINE_1, "none")
        return result.element_losses.sum()

    fd = directional_fd(value, params, direction)
    dot = float(sum((e * d).sum() for e, d in zip(exact, direction)))
    assert abs(dot - fd) <= 1e-5 * max(1.0, abs(fd)), (dot, fd)


@pytest.mark.parametrize("schedule", [ONLINE_1, ONLINE_2], ids=["1_per_step", "2_per_step"])
@pytest.mark.parametrize("kind", list(SPECS))
@pytest.mark.parametrize("engine", list(ENGINES))
def test_no_element_sees_its_own_target_or_a_later_one(engine, kind, schedule):
    """Perturb ``y_i`` and every later target: the online losses of the elements before
    ``i`` do not move; and the losses of element ``i`` for each value of ``y_i`` (later
    targets random) are those of one distribution: ``sum_c exp(-loss_i(c)) = 1``."""
    spec, model, lr, _ = setup(kind, "gated_mlp")
    run = ENGINES[engine]()
    n, full = 6, [6, 6, 6]
    y = targets(spec, 3, n, seed=1)

    def losses(y):
        with torch.enable_grad():
            result = run.run(
                model, batch_of(spec, y, full), spec.elementwise_loss, lr, schedule, "none"
            )
        return result.element_losses

    base = losses(y)
    values = 2 if spec.output_kind == "bits" else spec.output_dim
    for i in range(n):
        for seed in range(2):
            other = y.clone()
            other[:, i:] = targets(spec, 3, n, seed=10 + seed + i)[:, i:]
            torch.testing.assert_close(losses(other)[:, :i], base[:, :i], rtol=0, atol=1e-13)
        total = torch.zeros(3, dtype=torch.float64)
        for c in range(values):
            other = y.clone()
            other[:, i + 1 :] = targets(spec, 3, n, seed=30 + c + i)[:, i + 1 :]
            other[:, i] = c
            total += losses(other)[:, i].neg().exp()
        torch.testing.assert_close(total, torch.ones(3, dtype=torch.float64))
