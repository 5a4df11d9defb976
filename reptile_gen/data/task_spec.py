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
