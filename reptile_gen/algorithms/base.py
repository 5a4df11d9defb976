"""The LightningModule every meta-algorithm shares: inner-loop wiring, evaluation by
adaptation (with gradients on, also in validation and test), optimizers from config."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from functools import partial

import pytorch_lightning as pl
import torch
from torch import nn

from reptile_gen.data.task_batch import TaskBatch
from reptile_gen.data.task_spec import TaskSpec
from reptile_gen.inner_loop import InnerLoopEngine, InnerLR, InnerSchedule, make_engine
from reptile_gen.inner_loop.core.guard import DivergenceGuard
from reptile_gen.inner_loop.core.losses import loss_kind
from reptile_gen.inner_loop.core.rates import check_schedule
from reptile_gen.inner_loop.core.update import check_momentum
from reptile_gen.utils.stats import mean_and_ci95
from reptile_gen.utils.step_logs import RunningMeans, is_logging_step

__all__ = ["MetaLearner", "engine_config"]

# The validation and test metrics are computed on every rank from the gathered per-task
# results (MetaLearner._gather_eval_results), so they are already global and need no
# sync_dist; Lightning's advice to sync epoch-level metrics does not apply to them.
warnings.filterwarnings(
    "ignore", message=r"It is recommended to use `self.log\('(val|test)/.*sync_dist=True"
)


class MetaLearner(pl.LightningModule):
    """Shared base of MAML, first-order MAML, Reptile and joint training.

    Subclasses implement :meth:`meta_loss` (a scalar whose gradient with respect to the
    model's initial parameters, and learned inner learning rates, is the meta-gradient),
    so Lightning's backward, DDP gradient averaging, clipping and LR schedulers all apply.

    Args:
        model: the plain ``nn.Module`` whose initial parameters are meta-learned.
        task_spec: the task's :class:`TaskSpec` (loss, sizes).
        optimizer: outer optimizer factory (Hydra ``_partial_``) taking the parameters
            (default: Adam, lr 1e-3).
        scheduler: optional LR scheduler factory taking the optimizer (stepped each
            meta-step).
        engine: the inner-loop engine's config ``{name: functional|lowrank|higher,
            **options}`` (the ``engine`` config group, ``conf/engine/*.yaml``): functional
            takes ``chunk_size`` (tasks per ``vmap`` chunk) and ``compile`` (``true``
            compiles the few-shot meta-training step of an MLP with ``torch.compile``,
            MAML and first-order MAML; ``eager`` runs the same program op by op: see
            :mod:`reptile_gen.inner_loop.functional.compiled`); lowrank takes ``chunk_size``; higher
            takes ``inner_optimizer`` (``{name: sgd|adam|..., **kwargs}``). Default:
            ``{name: functional}``.
        inner_lr: each task's inner step size (never scaled by the meta-batch size).
        inner_lr_learned: ``none|scalar|per_tensor|per_parameter`` (Meta-SGD),
            ``per_step|per_layer_per_step`` (one learned rate per bucket of inner steps,
            shared or per parameter tensor), or ``per_unit`` (one per output unit of each
            tensor: a weight ``(out, in)`` has rates ``(out, 1)``, a learned plasticity
            per unit).
        inner_momentum: heavy-ball momentum ``beta`` of the inner SGD in ``[0, 1)``:
            ``v = beta * v + g``, ``p = p - rate * v`` (0: plain SGD). Engines
            functional (not compiled) and higher.
        inner_lr_schedule: the fixed factor of each inner step's rate: ``constant``,
            ``linear``, ``cosine``, ``exp`` (from 1 to ``inner_lr_end_factor`` over the
            steps of a training run) or a list of factors over equal buckets of steps; it
            multiplies learned rates too (see :mod:`reptile_gen.inner_loop.core.rates`).
        inner_lr_end_factor: the last step's factor of ``linear``, ``cosine``, ``exp``.
        inner_lr_buckets: per-step learned modes: how many learned rates along the inner
            loop (``null``: one per inner step).
        inner_steps: few-shot tasks: inner steps per task in training, each on the whole
            support set. Sequence tasks (``task_spec.sequential``) and ``None`` use the
            online schedule instead: one step per ``inner_batch_size`` elements.
        inner_batch_size: elements per inner step in the online schedule.
        objective: ``query`` (loss on the query set after adaptation), ``online`` (sum
            of pre-update losses along the support sequence: its NLL), or ``auto``
            (online for sequence tasks, query otherwise).
        eval_inner_steps: adaptation steps scored in validation and test (few-shot).
        eval_random_init: also score the freshly initialised model at test time (the
            random-initialisation baseline).
        checkpoint_segments: second-order MAML over long inner loops: ``null`` (keep the
            whole unroll), ``auto`` (sqrt(T) segments recomputed in backward, exact) or a
            segment count. Functional engine only.
        truncate_steps: second-order MAML differentiates through only the last ``k``
            inner updates (older ones first-order); ``null`` for all.
    """

    #: the algorithm's name in reports and messages (set by subclasses)
    display_name = "meta-learner"
    #: the family the algorithm belongs to: maml | reptile | transfer | likelihood
    family = "maml"
    #: what flows back through the inner loop (set by subclasses)
    grad_mode = "second_order"
    #: whether learned inner learning rates receive a gradient from this algorithm
    learns_inner_lr = True
    #: whether training runs an inner loop (an engine): false for the LSTM baseline
    has_inner_loop = True

    @classmethod
    def display_name_for(cls, config: Mapping | None = None) -> str:
        """:attr:`display_name` of the algorithm that ``config`` (its constructor
        arguments, e.g. a run's ``algorithm`` node) builds with this class."""
        return cls.display_name

    def __init__(
        self,
        model: nn.Module,
        task_spec: TaskSpec,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable | None = None,
        engine: Mapping | None = None,
        inner_lr: float = 0.01,
        inner_lr_learned: str = "none",
        inner_lr_schedule: str | Sequence[float] = "constant",
        inner_lr_end_factor: float = 0.1,
        inner_lr_buckets: int | None = None,
        inner_momentum: float = 0.0,
        inner_steps: int | None = 1,
        inner_batch_size: int = 1,
        objective: str = "auto",
        eval_inner_steps: int = 10,
        eval_random_init: bool = True,
        checkpoint_segments: int | str | None = None,
        truncate_steps: int | None = None,
    ) -> None:
        super().__init__()
        self._train_means = RunningMeans()
        engine = engine_config(engine)
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler", "task_spec"])
        # the plain mapping with its name (a subclass's own arguments may hold the original)
        self.hparams["engine"] = engine
        _check_positive("algorithm.inner_lr", inner_lr, float)
        if inner_steps is not None:
            _check_positive("algorithm.inner_steps", inner_steps, int)
        _check_positive("algorithm.inner_batch_size", inner_batch_size, int)
        _check_positive("algorithm.eval_inner_steps", eval_inner_steps, int, allow_zero=True)
        if objective not in ("auto", "query", "online"):
            raise ValueError(f"algorithm.objective={objective!r}; allowed: auto, query, online")
        # sequence tasks always run the online schedule (one SGD step per element)
        sequential = task_spec.sequential or inner_steps is None
        if objective == "auto":
            objective = "online" if task_spec.sequential else "query"
        # only a sequence task lacks a query set (a few-shot task may adapt online and
        # still be scored on its query set)
        if objective == "query" and task_spec.sequential:
            raise ValueError(
                f"algorithm.objective=query with task {task_spec.name!r}: a sequence task "
                "has no query set; allowed: online (or auto)"
            )
        if isinstance(inner_lr_schedule, Sequence) and not isinstance(inner_lr_schedule, str):
            inner_lr_schedule = list(inner_lr_schedule)  # a ListConfig from the config
        check_schedule(inner_lr_schedule, inner_lr_end_factor)
        inner_momentum = check_momentum(inner_momentum)
        if inner_lr_learned != "none" and not self.learns_inner_lr:
            raise ValueError(
                f"algorithm.inner_lr_learned={inner_lr_learned!r} with "
                f"{self.display_name}: this algorithm gives inner learning rates no "
                "gradient; allowed: none (use algorithm=maml or fomaml for Meta-SGD)"
            )
        self.model = model
        self.task_spec = task_spec
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, lr=1e-3)
        self.scheduler_factory = scheduler
        if self.grad_mode != "second_order":
            for key, value in (
                ("checkpoint_segments", checkpoint_segments),
                ("truncate_steps", truncate_steps),
            ):
                if value is not None:
                    algorithm = (
                        "first-order MAML" if self.grad_mode == "first_order" else self.display_name
                    )
                    raise ValueError(
                        f"algorithm.{key}={value!r} with {algorithm}: only "
                        "second-order MAML keeps an unroll to checkpoint or truncate; "
                        "allowed: null"
                    )
        options = dict(engine)
        name = options.pop("name")
        inner_optimizer = options.pop("inner_optimizer", None)
        chunk_size = options.pop("chunk_size", None)
        compile_ = options.pop("compile", False)
        extra = {}
        if name == "lowrank" and "fold" in options:
            extra["fold"] = options.pop("fold")
        if options:
            key = next(iter(options))
            raise ValueError(
                f"engine.{key}={options[key]!r}: not an engine option; allowed: "
                "engine.chunk_size, engine.compile (functional), engine.inner_optimizer "
                "(higher), engine.fold (lowrank)"
            )
        if compile_ and self.grad_mode == "none":
            raise ValueError(
                f"engine.compile={compile_!r} with {self.display_name}: it compiles the "
                "meta-gradient through the inner loop, which this algorithm does not take; "
                "allowed: engine.compile=false, or algorithm=maml or fomaml"
            )
        self.engine: InnerLoopEngine = make_engine(
            name,
            inner_optimizer,
            chunk_size=chunk_size,
            checkpoint_segments=checkpoint_segments,
            truncate_steps=truncate_steps,
            inner_lr_learned=inner_lr_learned,
            inner_lr_schedule=inner_lr_schedule,
            inner_momentum=inner_momentum,
            compile=compile_,
            **extra,
        )
        self.inner_lr = InnerLR(
            [(n, p.shape) for n, p in model.named_parameters()],
            inner_lr,
            inner_lr_learned,
            schedule=inner_lr_schedule,
            end_factor=inner_lr_end_factor,
            buckets=inner_lr_buckets,
            momentum=inner_momentum,
            horizon=_inner_horizon(
                task_spec, None if sequential else inner_steps, inner_batch_size
            ),
        )
        self.objective = objective
        self.train_schedule = InnerSchedule(None if sequential else inner_steps, inner_batch_size)
        self.eval_inner_steps = eval_inner_steps
        self.eval_random_init = eval_random_init
        # The random-initialisation baseline: the weights before any meta-training.
        # Seeded like the run, so a re-evaluated checkpoint rebuilds the same ones.
        self._initial_state = copy.deepcopy(model.state_dict())
        self._eval_outputs: dict[str, list[torch.Tensor]] = {}
        # the first non-finite training value stops the run (inner_loop/core/guard.py)
        self.divergence_guard = DivergenceGuard()

    # ------------------------------------------------------------------ inner loop
    def loss_fn(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.task_spec.elementwise_loss(pred, target)

    @property
    def loss_kind(self) -> str | None:
        """The output kind whose loss :meth:`loss_fn` is (the engines then take its
        closed form), None where a subclass replaces the loss."""
        if type(self).loss_fn is not MetaLearner.loss_fn:
            return None
        return loss_kind(self.task_spec.elementwise_loss)

    def adapt(
        self,
        batch: TaskBatch,
        grad_mode: str,
        schedule: InnerSchedule | None = None,
        model: nn.Module | None = None,
        **kwargs,
    ):
        """Run the configured engine on ``batch`` (see :class:`InnerLoopEngine.run`)."""
        result = self.engine.run(
            model if model is not None else self.model,
            batch,
            self.loss_fn,
            self.inner_lr,
            schedule or self.train_schedule,
            grad_mode,
            **kwargs,
        )
        if self.training:
            self.divergence_guard.check_losses("inner loss", result.step_losses)
            self.divergence_guard.check_losses("query loss", result.query_losses)
        return result

    def objective_loss(self, result, batch: TaskBatch) -> torch.Tensor:
        """The meta-objective of one inner loop over a meta-batch.

        ``query``: the query loss after adaptation, averaged over tasks. ``online``: the
        summed online NLL of the batch's sequences divided by their number of real
        elements (padding excluded), so the outer step size does not depend on sequence
        length or on how far a batch is padded.
        """
        if self.objective == "query":
            return result.query_objective()
        real = batch.support_mask.sum().clamp(min=1).to(result.element_losses.dtype)
        return result.element_losses.sum() / real

    # ------------------------------------------------------------------ training
    def meta_loss(self, batch: TaskBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def training_step(self, batch: TaskBatch, batch_idx: int) -> torch.Tensor:
        loss, logs = self.meta_loss(batch)
        self.divergence_guard.check_losses("meta-loss", loss)
        values = {"train/meta_loss": loss, **{f"train/{k}": v for k, v in logs.items()}}
        if self.inner_lr.learned == "scalar":
            values["train/inner_lr"] = self.inner_lr.scalar
        self._train_means.add(values)
        if is_logging_step(self):
            # the mean since the last write; under DDP the mean over ranks too
            for key, mean in self._train_means.pop().items():
                self.log(key, mean, prog_bar=key == "train/meta_loss", sync_dist=True)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        self.divergence_guard.check_before_step(
            self.named_parameters(), self.global_step, self.inner_lr
        )

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    # ------------------------------------------------------------------ evaluation
    @property
    def eval_schedule(self) -> InnerSchedule:
        if self.train_schedule.num_steps is None:
            return self.train_schedule
        return self.train_schedule.with_steps(self.eval_inner_steps)

    @property
    def is_sequence_model(self) -> bool:
        """Online schedule (SGD as a sequence model) rather than few-shot adaptation."""
        return self.train_schedule.num_steps is None

    def evaluate_batch(self, batch: TaskBatch, model: nn.Module | None = None) -> torch.Tensor:
        """Per-task evaluation, ``[B, k]``.

        Few-shot: query loss after 0..N adaptation steps (``k = N + 1``). Sequences: the
        online negative log-likelihood of each sequence in nats and its number of real
        elements (``k = 2``). Runs with gradients enabled (the inner loop needs them)
        but builds no graph to the initial parameters.
        """
        with torch.enable_grad():
            result = self.adapt(
                batch,
                "none",
                self.eval_schedule,
                model=model,
                track_query=not self.is_sequence_model,
            )
        if self.is_sequence_model:
            nll = result.element_losses.detach().sum(1)
            return torch.stack([nll, batch.support_mask.sum(1).to(nll.dtype)], dim=1)
        return result.query_losses.detach()

    def _eval_step(self, stage: str, batch: TaskBatch) -> None:
        self._eval_outputs.setdefault(stage, []).append(self.evaluate_batch(batch))
        if stage == "test" and self.eval_random_init:
            self._eval_outputs.setdefault("test/random_init", []).append(
                self.evaluate_batch(batch, model=self._random_init_model())
            )

    def validation_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val", final_only=True)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")
        if self.eval_random_init:
            self._log_eval("test/random_init")

    def _log_eval(self, prefix: str, final_only: bool = False) -> None:
        outputs = self._eval_outputs.pop(prefix, [])
        distributed = self._trainer is not None and self.trainer.world_size > 1
        if not outputs and not distributed:
            return
        # every rank takes part in the gather, also one whose share was empty
        results = self._gather_eval_results(outputs)
        if results.shape[0] == 0:
            return
        self.eval_curves = getattr(self, "eval_curves", {})
        self.eval_curves[prefix] = results.cpu()
        if self.is_sequence_model:
            self._log_sequence_metrics(prefix, results)
        else:
            self._log_curve_metrics(prefix, results, final_only)

    def _eval_width(self) -> int:
        """Columns of :meth:`evaluate_batch`'s result."""
        return 2 if self.is_sequence_model else self.eval_schedule.num_steps + 1

    def _gather_eval_results(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """This rank's per-task results, ``[n, k]``, or under DDP those of all ranks in
        rank order: with the held-out sets split into contiguous shares (see
        :class:`~reptile_gen.data.base.HeldOutShard`) that is the single-process order,
        so every metric equals the single-process one on the same tasks.

        Shares may differ in size (or be empty): the counts are gathered first and each
        share is padded to the largest before the gather, and the padding is dropped.
        """
        width = outputs[0].shape[1] if outputs else self._eval_width()
        local = (
            torch.cat(outputs)
            if outputs
            else torch.zeros(0, width, dtype=self.dtype, device=self.device)
        )
        if self._trainer is None or self.trainer.world_size == 1:
            return local
        counts = self.all_gather(torch.tensor(local.shape[0], device=local.device))
        counts = [int(c) for c in counts.reshape(-1).tolist()]
        if max(counts) == 0:
            return local
        padded = local.new_zeros(max(counts), width)
        padded[: local.shape[0]] = local
        gathered = self.all_gather(padded).reshape(len(counts), max(counts), width)
        return torch.cat([gathered[rank, :count] for rank, count in enumerate(counts)])

    def _log_curve_metrics(self, prefix: str, losses: torch.Tensor, final_only: bool) -> None:
        """``{prefix}/mse_step_k`` (and ``_ci95``) for k adaptation steps."""
        name = self.task_spec.loss_name
        last = losses.shape[1] - 1
        for step in [last] if final_only else range(losses.shape[1]):
            mean, ci = mean_and_ci95(losses[:, step])
            self.log(f"{prefix}/{name}_step_{step}", mean, rank_zero_only=True)
            if not final_only:
                self.log(f"{prefix}/{name}_step_{step}_ci95", ci, rank_zero_only=True)
        if prefix == "val":
            self.log("val/loss", losses[:, last].mean().item(), prog_bar=True, rank_zero_only=True)

    def _log_sequence_metrics(self, prefix: str, results: torch.Tensor) -> None:
        """Test likelihood as the literature reports it: nats per sequence (mean and 95%
        CI over sequences) and bits per token (total nats / total tokens / ln 2)."""
        nll, tokens = results[:, 0].double(), results[:, 1].double()
        spec = self.task_spec
        mean, ci = mean_and_ci95(nll)
        bits = (nll.sum() / tokens.sum().clamp(min=1) / math.log(2)).item()
        self.log(f"{prefix}/nll_nats_per_{spec.sequence_name}", mean, rank_zero_only=True)
        self.log(f"{prefix}/nll_nats_per_{spec.sequence_name}_ci95", ci, rank_zero_only=True)
        self.log(f"{prefix}/nll_bits_per_{spec.token_name}", bits, rank_zero_only=True)
        self.log(f"{prefix}/num_sequences", float(nll.numel()), rank_zero_only=True)
        if prefix == "val":
            self.log("val/loss", bits, prog_bar=True, rank_zero_only=True)

    def _random_init_model(self) -> nn.Module:
        # kept out of the module tree: not a submodule, not in checkpoints or optimizers
        if self.__dict__.get("_random_model") is None:
            random_model = copy.deepcopy(self.model)
            random_model.load_state_dict(self._initial_state)
            self.__dict__["_random_model"] = random_model
        return self.__dict__["_random_model"]


def engine_config(engine: Mapping | None) -> dict:
    """``engine`` (a mapping or ``DictConfig``, or None for the functional engine) as a
    plain ``dict`` with its ``name``; saved in the hyper-parameters as it is."""
    if engine is None:
        return {"name": "functional"}
    if not isinstance(engine, Mapping):
        raise ValueError(
            f"engine={engine!r}; must be a mapping {{name: functional|lowrank|higher, ...}} "
            "(on the command line: engine=functional|lowrank|higher)"
        )
    from omegaconf import DictConfig, OmegaConf

    plain = (
        OmegaConf.to_container(engine, resolve=True) if isinstance(engine, DictConfig) else engine
    )
    out = copy.deepcopy(dict(plain))
    out.setdefault("name", "functional")
    return out


def _inner_horizon(task_spec: TaskSpec, inner_steps: int | None, inner_batch_size: int):
    """Inner steps of a training run, the span of a rate schedule: few-shot, the
    training ``inner_steps``; a sequence task, its positions over ``inner_batch_size``;
    None when only the data tell (an online schedule on a few-shot task)."""
    if inner_steps is not None:
        return int(inner_steps)
    if task_spec.sequential and task_spec.input_sizes:
        return math.ceil(math.prod(task_spec.input_sizes) / inner_batch_size)
    return None


def _check_positive(name: str, value, kind, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        kind_name = "an integer" if kind is int else "a number"
        raise ValueError(f"{name}={value!r}; must be {kind_name} {bound}")
