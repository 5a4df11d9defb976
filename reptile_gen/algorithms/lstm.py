"""An ordinary autoregressive LSTM: the likelihood baseline of the original reptile-gen.

Where the meta-learners model a sequence by adapting a network with one SGD step per
element, this baseline conditions on the past with a recurrent state: the input at
position ``i`` is ``concat(encoder(x_i), embedding(y_{i-1}))`` (``y_{-1}`` is a learned
start token), and a linear head predicts ``y_i``. It is trained by maximum likelihood and
scored exactly like the meta-learners on sequence tasks (the same per-sequence NLL in
nats, number of real elements, and logged metrics), by reusing :class:`MetaLearner`'s
evaluation and logging.

The baseline has its own network, :class:`reptile_gen.models.lstm.LSTMNetwork`, sized by
``algorithm.hidden_size``, ``num_layers``, ``embedding_dim`` and ``dropout``: the
``model=`` networks (MLP, SIREN, ...) predict one element from its input alone and cannot
condition on the past. It follows ``model=`` only when that builds an ``LSTMNetwork``;
any other ``model=`` network is left unused, and the run's log says so in one line.
Checkpoints keep their keys (``model.encoder``, ``model.prev_embedding``, ``model.body``,
``model.head``): the network is still the module's ``model``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from reptile_gen.algorithms.base import MetaLearner, _check_positive
from reptile_gen.data.task_batch import TaskBatch
from reptile_gen.data.task_spec import TaskSpec
from reptile_gen.models.lstm import LSTMNetwork

__all__ = ["LSTMBaseline", "LSTMNetwork"]

log = logging.getLogger(__name__)


class LSTMBaseline(MetaLearner):
    """Maximum-likelihood training of an :class:`LSTMNetwork` on a sequence task.

    A LightningModule on :class:`MetaLearner` so that validation, test, the random-init
    baseline and every logged metric are those of the meta-learners: :meth:`evaluate_batch`
    returns the same ``[B, 2]`` (per-sequence NLL in nats, number of real elements). The
    training loss is the summed masked NLL divided by the number of real elements (the
    normalization of the meta-learners' online objective). There is no inner loop: the
    parent's engine is built but never run, and learned inner learning rates are an error.

    Args:
        model: the ``model=`` group's network that ``build_run`` passes to every
            algorithm: used when it is an :class:`LSTMNetwork`, else unused (the LSTM is
            built here from ``task_spec`` and the sizes below, and the log says so).
        task_spec: a sequence task (``sequential``) with ``bits`` or ``classes`` outputs.
        optimizer, scheduler: as for every algorithm (default Adam, lr 1e-3).
        hidden_size, num_layers, embedding_dim, dropout: of the :class:`LSTMNetwork`.
        inner_lr_learned: must be ``none`` (kept so that a sweep over it fails clearly).
        eval_random_init: also score the untrained LSTM at test time.
    """

    display_name = "LSTM"
    family = "likelihood"
    grad_mode = "none"
    learns_inner_lr = False
    #: no SGD-per-element dynamics to replay (e.g. for the online sampler): the sequence
    #: distribution is the LSTM's own (``getattr(module, "has_inner_loop", True)``)
    has_inner_loop = False
    #: its own network's family (``reptile-gen-compare`` keeps its random-init baseline
    #: apart from the ``model=`` networks')
    network_name = "lstm"

    def __init__(
        self,
        model: nn.Module | None,
        task_spec: TaskSpec,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable | None = None,
        hidden_size: int = 256,
        num_layers: int = 2,
        embedding_dim: int = 64,
        dropout: float = 0.0,
        inner_lr_learned: str = "none",
        eval_random_init: bool = True,
    ) -> None:
        if not task_spec.sequential or task_spec.output_kind not in ("bits", "classes"):
            raise ValueError(
                f"algorithm=lstm with task {task_spec.name!r}: the LSTM baseline models "
                "the likelihood of sequences, and this task is not a sequence task with "
                "discrete outputs (few-shot regression with a query set is what the "
                "meta-learners are for); allowed tasks: text, mnist, digits "
                "(or use algorithm=maml|fomaml|reptile|joint)"
            )
        if task_spec.prev_input:
            raise ValueError(
                "task.prev_input=true with algorithm=lstm: the LSTM baseline always feeds "
                "the previous element back; allowed: task.prev_input=false (the option is "
                "for the meta-learners: maml, fomaml, reptile, joint)"
            )
        _check_positive("algorithm.hidden_size", hidden_size, int)
        _check_positive("algorithm.num_layers", num_layers, int)
        _check_positive("algorithm.embedding_dim", embedding_dim, int)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise ValueError(f"algorithm.dropout={dropout!r}; must be a number in [0, 1)")
        if not 0 <= dropout < 1:
            raise ValueError(f"algorithm.dropout={dropout!r}; must be a number in [0, 1)")
        if isinstance(model, LSTMNetwork):
            network = model
        else:
            if model is not None:
                log.info(
                    "algorithm=lstm has its own network (reptile_gen.models.lstm.LSTMNetwork, "
                    "sized by algorithm.hidden_size/num_layers/embedding_dim/dropout); the "
                    "model= network (%s) is not used",
                    type(model).__name__,
                )
            network = LSTMNetwork(
                task_spec,
                hidden_size=int(hidden_size),
                num_layers=int(num_layers),
                embedding_dim=int(embedding_dim),
                dropout=float(dropout),
            )
        # the LSTM takes the place of the meta-learned model: it is what is trained,
        # checkpointed, and deep-copied (at its initial weights) for the random-init
        # baseline; the unused ``model`` is dropped
        super().__init__(
            network,
            task_spec,
            optimizer=optimizer,
            scheduler=scheduler,
            inner_lr_learned=inner_lr_learned,
            inner_steps=None,  # the online schedule: is_sequence_model, [B, 2] evaluation
            objective="online",
            eval_random_init=eval_random_init,
        )

    # ------------------------------------------------------------------ likelihood
    def element_losses(self, batch: TaskBatch, model: nn.Module | None = None) -> torch.Tensor:
        """``[B, T]`` NLL of each element in nats (teacher forcing), zero on padding."""
        network = model if model is not None else self.model
        prev = network.previous_tokens(batch.support_y)
        pred, _ = network(batch.support_x, prev)
        losses = self.loss_fn(pred, batch.support_y)
        return torch.where(batch.support_mask, losses, torch.zeros_like(losses))

    def meta_loss(self, batch: TaskBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Maximum likelihood: summed NLL over real elements / their number."""
        losses = self.element_losses(batch)
        real = batch.support_mask.sum().clamp(min=1).to(losses.dtype)
        return losses.sum() / real, {}

    def evaluate_batch(self, batch: TaskBatch, model: nn.Module | None = None) -> torch.Tensor:
        """``[B, 2]``: each sequence's NLL in nats and its number of real elements."""
        with torch.no_grad():
            nll = self.element_losses(batch, model).sum(1)
        return torch.stack([nll, batch.support_mask.sum(1).to(nll.dtype)], dim=1)

    def adapt(self, *args, **kwargs):
        raise RuntimeError("LSTMBaseline has no inner loop to adapt with")
