"""What a task's inputs and targets are, and therefore its encoder, head size and loss.

The loss is chosen explicitly by the task config, never inferred from tensor dtypes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["TaskSpec", "INPUT_KINDS", "OUTPUT_KINDS", "TASK_KINDS"]

INPUT_KINDS = ("continuous", "discrete")
OUTPUT_KINDS = ("real", "classes", "bits")
#: what a task is, for what is built on top of it (sampling, reports): ``text`` (lines of
#: bytes), ``image`` (binary images on a pixel grid), ``sine`` (sine regression), or
#: ``generic`` (nothing task-specific)
TASK_KINDS = ("generic", "text", "image", "sine")


@dataclass(frozen=True)
class TaskSpec:
    """Description of one task family.

    Args:
        input_kind: ``continuous`` (features, ``input_dim`` of them) or ``discrete``
            (integer coordinates, one per entry of ``input_sizes``, e.g. ``(28, 28)``).
        output_kind: ``real`` (MSE over ``output_dim`` values), ``classes``
            (cross-entropy over ``output_dim`` classes) or ``bits`` (binary cross-entropy).
        name: the task's name, stored in checkpoints to refuse a mismatched one.
        sequential: a sequence task (text, images): no query set, the inner loop takes
            one SGD step per element and the objective is the online NLL.
        sequence_name, token_name: what one task and one element are called in metric
            names (``line``/``char`` for text: ``nll_bits_per_char``; ``image``/``pixel``).
        kind: what the task is (:data:`TASK_KINDS`): the sampler and the run reports are
            chosen by it, never guessed from the output kind.
        prev_input: the input of element ``i`` is ``(x_i, y_{i-1})``: the previous
            element's target is one more discrete coordinate after ``input_sizes``
            (:attr:`start_token` before the first element), so the encoder gets one more
            embedding table (:attr:`encoder_sizes`) and nothing else changes. Sequence
            tasks with discrete inputs and ``bits`` or ``classes`` targets only.
    """

    input_kind: str
    output_kind: str
    input_dim: int = 1
    input_sizes: tuple[int, ...] = ()
    output_dim: int = 1
    name: str = "task"
    sequential: bool = False
    sequence_name: str = "seq"
    token_name: str = "token"
    kind: str = "generic"
    prev_input: bool = False

    def __post_init__(self) -> None:
        if self.input_kind not in INPUT_KINDS:
            raise ValueError(f"input_kind={self.input_kind!r}; allowed: {', '.join(INPUT_KINDS)}")
        if self.output_kind not in OUTPUT_KINDS:
            raise ValueError(
                f"output_kind={self.output_kind!r}; allowed: {', '.join(OUTPUT_KINDS)}"
            )
        if self.kind not in TASK_KINDS:
            raise ValueError(f"kind={self.kind!r}; allowed: {', '.join(TASK_KINDS)}")
        if self.input_kind == "discrete" and not self.input_sizes:
            raise ValueError("a discrete input needs input_sizes (one size per coordinate)")
        if self.prev_input and not (
            self.sequential and self.input_kind == "discrete" and self.output_kind != "real"
        ):
            raise ValueError(
                f"task.prev_input=true with task {self.name!r}: the previous element's target "
                "is an input only for sequence tasks with discrete inputs and bits or classes "
                "targets; allowed: text, mnist, digits (or task.prev_input=false)"
            )

    @property
    def start_token(self) -> int:
        """The token that stands for "no previous element" when a previous target is
        fed back as an input: the value after the last target (2 for bits, the number of
        classes for classes). Shared by ``task.prev_input`` and the LSTM baseline."""
        if self.output_kind == "real":
            raise ValueError(f"task {self.name!r} has real targets: no target tokens")
        return 2 if self.output_kind == "bits" else self.output_dim

    @property
    def encoder_sizes(self) -> tuple[int, ...]:
        """The sizes of the model's discrete input coordinates: ``input_sizes``, and with
        ``prev_input`` one more for the previous target (its values and the start token)."""
        if self.prev_input:
            return (*self.input_sizes, self.start_token + 1)
        return self.input_sizes

    def previous_targets(self, y: torch.Tensor) -> torch.Tensor:
        """``[..., S]`` long: the start token, then ``y_0 .. y_{S-2}`` (the target of the
        element before each element, in sequence order)."""
        y = y.long()
        start = torch.full_like(y[..., :1], self.start_token)
        return torch.cat([start, y[..., :-1]], dim=-1)

    def with_previous(self, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """Element coordinates ``x [..., S]`` (one coordinate) or ``[..., S, k]`` with the
        previous targets ``prev [..., S]`` appended as the last coordinate:
        ``[..., S, k + 1]`` long."""
        x = x.long()
        if x.dim() == prev.dim():
            x = x.unsqueeze(-1)
        return torch.cat([x, prev.long().unsqueeze(-1)], dim=-1)

    def model_inputs(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The model's inputs for a sequence of elements ``x`` with targets ``y``: ``x``
        itself, or with ``prev_input`` ``x`` with each element's previous target appended
        (teacher forcing, as in the LSTM baseline)."""
        if not self.prev_input:
            return x
        return self.with_previous(x, self.previous_targets(y))

    def element_coordinates(self, inputs: torch.Tensor) -> torch.Tensor:
        """The element coordinates of model ``inputs`` (what :meth:`model_inputs` was
        given as ``x``, with a trailing coordinate dimension): the previous target left
        out with ``prev_input``, the inputs themselves otherwise."""
        return inputs[..., :-1] if self.prev_input else inputs

    @property
    def head_features(self) -> int:
        """Width of the model's output layer."""
        return 1 if self.output_kind == "bits" else self.output_dim

    @property
    def loss_name(self) -> str:
        return {"real": "mse", "classes": "nll", "bits": "nll"}[self.output_kind]

    def elementwise_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of each element: ``pred`` is ``[..., head_features]``, the result ``[...]``.

        ``real``: squared error averaged over output dims; ``classes``: cross-entropy in
        nats (target ``[...]`` long); ``bits``: binary cross-entropy in nats (target
        ``[...]`` in {0, 1}).
        """
        if self.output_kind == "real":
            return (pred - target).pow(2).mean(-1)
        if self.output_kind == "classes":
            flat = F.cross_entropy(
                pred.reshape(-1, pred.shape[-1]), target.reshape(-1).long(), reduction="none"
            )
            return flat.reshape(target.shape)
        return F.binary_cross_entropy_with_logits(
            pred.squeeze(-1), target.to(pred.dtype), reduction="none"
        )
