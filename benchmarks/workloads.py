"""The registry of benchmark workloads.

A workload is a Hydra composition of the real ``conf/`` (task, model, algorithm and their
options) plus the engines it is timed with:

* *engines* are the choices of the ``engine`` config group (``functional``, ``higher``,
  ``lowrank``); the module is built with ``engine=<engine>`` and timed
  through its own ``meta_loss``;
* *baselines* are hand-written meta-losses (:mod:`benchmarks.baselines`) run on the module
  built with the :attr:`Workload.reference` engine (same parameters, same optimizer).

Some engines cannot run a workload on the machine the numbers were taken on (out of memory,
no checkpointing): :attr:`Workload.skip` names them with the reason, and the run records
them as skipped rather than leaving them out. Heavy workloads carry their own timing
budget (:attr:`Workload.budget`), and the heaviest run only with ``--full``
(:attr:`Workload.full_only`).

Add a workload with :func:`register` (see ``benchmarks/README.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from benchmarks.baselines import (
    functional_graph_meta_loss,
    functional_vmap_grad_meta_loss,
    plain_loop_maml_meta_loss,
    vmap_reference_maml_meta_loss,
)
from benchmarks.original_method import all_positions_real, original_method_meta_loss
from reptile_gen.data.task_batch import TaskBatch

__all__ = [
    "ENGINE_OVERRIDE",
    "ENGINE_VARIANTS",
    "BUDGET_KEYS",
    "Workload",
    "WORKLOADS",
    "register",
    "get",
    "sample_batches",
    "prefix_batches",
]

#: how an engine is selected in the config
ENGINE_OVERRIDE = "engine={engine}"

#: engines that are another engine with options: ``{name: (engine, extra overrides)}``
ENGINE_VARIANTS = {
    # the functional engine's meta-training step as a torch.compile-d program
    # (reptile_gen.inner_loop.functional.compiled); its first step's compile time is reported apart
    "functional_compiled": ("functional", ("engine.compile=true",)),
}

#: the timing settings a workload's :attr:`Workload.budget` may set per mode
BUDGET_KEYS = ("warmup", "min_steps", "max_steps", "min_time_s", "max_time_s", "repeats")


def sample_batches(datamodule, num_batches: int, seed: int) -> list[TaskBatch]:
    """Default batch source: ``datamodule.sample(generator)`` if the DataModule has it
    (sine), else the first batches of its training loader."""
    if hasattr(datamodule, "sample"):
        generator = torch.Generator().manual_seed(seed)
        return [datamodule.sample(generator) for _ in range(num_batches)]
    datamodule.setup("fit")
    batches = []
    for batch in datamodule.train_dataloader():
        batches.append(batch)
        if len(batches) == num_batches:
            break
    return batches


def prefix_batches(length: int, num_tasks: int | None = None) -> Callable[..., list[TaskBatch]]:
    """A batch source: :func:`sample_batches` cut to the first ``length`` support elements
    of each sequence (and the first ``num_tasks`` tasks, if given), e.g. the first 128
    pixels of each MNIST image, so a second-order unroll that does not fit over 784
    steps fits over 128."""

    def cut(datamodule, num_batches: int, seed: int) -> list[TaskBatch]:
        out = []
        for b in sample_batches(datamodule, num_batches, seed):
            b = b[:num_tasks] if num_tasks is not None else b
            out.append(
                replace(
                    b,
                    support_x=b.support_x[:, :length],
                    support_y=b.support_y[:, :length],
                    support_mask=b.support_mask[:, :length],
                )
            )
        return out

    cut.__name__ = f"prefix_batches({length}{'' if num_tasks is None else f', {num_tasks}'})"
    return cut


@dataclass(frozen=True)
class Workload:
    """One thing to time.

    Attributes:
        name: registry key (``--workloads``).
        description: one line for the report.
        overrides: Hydra overrides on ``conf/config.yaml`` (the engine's is added).
        engines: ``engine`` choices to time.
        baselines: hand-written meta-losses ``(module, batch) -> (loss, logs)`` by name,
            run on the module built with ``reference``.
        reference: the engine the ratios are taken against and the baselines' gradients
            are checked against.
        batches: ``(datamodule, num_batches, seed) -> [TaskBatch]``, the meta-batches the
            steps cycle through (sampled before timing starts).
        check_grads: compare every timed engine's and baseline's meta-gradient with the
            reference's (float64) before timing.
        check_note: why the gradients are not checked, or what the check runs on
            (recorded in the JSON).
        check_overrides: extra Hydra overrides for the gradient check only (e.g. a
            smaller meta-batch), so a heavy workload is checked on a tiny variant.
        check_batches: the batch source of the gradient check (default: ``batches``),
            e.g. :func:`prefix_batches` to check on the first few elements only.
        min_time_s: optional per-workload override of the timing budget (slow workloads).
        budget: per mode (``quick``/``full``), timing settings that replace the mode's
            defaults for this workload (keys in :data:`BUDGET_KEYS`; ``max_time_s`` stops
            timing once that many seconds of steps are timed, after at least one step).
            Options given on the command line win over both.
        timeout_s: seconds per subprocess for this workload (default: ``--timeout``).
        skip: engines never run, ``{engine: reason}``; recorded as skipped with the reason.
        full_only: if set, the workload runs only with ``--full`` (this is the reason,
            e.g. its cost per meta-step); without it, it is recorded as skipped.
        compare_with: another workload whose reference entry this one's is compared
            with (time and memory ratios in ``comparisons``), e.g. checkpointed vs full.
        quick_batches: the batch source in quick mode (default: ``batches``), e.g. a
            prefix of each sequence so a long workload fits the quick suite's time.
        quick_note: what quick mode runs instead (recorded in the JSON entry).
        bound: what limits the workload, ``flops`` or ``bytes`` (the table's fraction
            of the machine's matmul or copy rate, see :mod:`benchmarks.costs`).
    """

    name: str
    description: str
    overrides: tuple[str, ...]
    engines: tuple[str, ...] = ("functional", "higher")
    baselines: dict[str, Callable] = field(default_factory=dict)
    reference: str = "functional"
    batches: Callable[..., list[TaskBatch]] = sample_batches
    check_grads: bool = True
    check_note: str = ""
    check_overrides: tuple[str, ...] = ()
    check_batches: Callable[..., list[TaskBatch]] | None = None
    min_time_s: float | None = None
    budget: dict[str, dict] = field(default_factory=dict)
    timeout_s: float | None = None
    skip: dict[str, str] = field(default_factory=dict)
    full_only: str | None = None
    compare_with: str | None = None
    quick_batches: Callable[..., list[TaskBatch]] | None = None
    quick_note: str | None = None
    bound: str = "bytes"

    @property
    def all_engines(self) -> tuple[str, ...]:
        return self.engines + tuple(self.baselines)

    def skip_reason(self, engine: str, full: bool) -> str | None:
        """Why ``engine`` is not run on this workload (None: it is run)."""
        if engine in self.skip:
            return self.skip[engine]
        if self.full_only and not full:
            return f"full_only (run with --full): {self.full_only}"
        return None

    def overrides_for(self, engine: str) -> list[str]:
        """The full override list of ``engine`` (a baseline uses the reference engine)."""
        built_with = self.reference if engine in self.baselines else engine
        built_with, extra = ENGINE_VARIANTS.get(built_with, (built_with, ()))
        return [*self.overrides, ENGINE_OVERRIDE.format(engine=built_with), *extra]


WORKLOADS: dict[str, Workload] = {}


def register(workload: Workload) -> Workload:
    if workload.name in WORKLOADS:
        raise ValueError(f"workload {workload.name!r} is registered twice")
    if workload.reference not in workload.engines:
        raise ValueError(f"workload {workload.name!r}: reference engine not in its engines")
    if workload.reference in workload.skip:
        raise ValueError(f"workload {workload.name!r}: its reference engine is skipped")
    for mode, values in workload.budget.items():
        unknown = set(values) - set(BUDGET_KEYS)
        if mode not in ("quick", "full") or unknown:
            raise ValueError(
                f"workload {workload.name!r}: budget[{mode!r}] has {sorted(unknown)}; "
                f"allowed modes quick, full and keys {', '.join(BUDGET_KEYS)}"
            )
    WORKLOADS[workload.name] = workload
    return workload


def get(name: str) -> Workload:
    try:
        return WORKLOADS[name]
    except KeyError:
        raise SystemExit(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}") from None


# ---------------------------------------------------------------------- sine MAML
for _steps in (1, 5):
    register(
        Workload(
            name=f"sine_maml_{_steps}step",
            description=(
                f"sine MAML (second order), meta-batch 25, K=10, 100 query, "
                f"{_steps} inner step{'s' if _steps > 1 else ''}, MLP 40x40"
            ),
            overrides=(
                "task=sine",
                "model=mlp",
                "algorithm=maml",
                f"algorithm.inner_steps={_steps}",
                "task.meta_batch_size=25",
                "task.num_support=10",
                "task.num_query=100",
            ),
            engines=("functional", "functional_compiled", "higher"),
            baselines={
                "plain_loop": plain_loop_maml_meta_loss,
                "vmap_reference": vmap_reference_maml_meta_loss,
                "functional_vmap_grad": functional_vmap_grad_meta_loss,
                "functional_graph": functional_graph_meta_loss,
            },
            bound="flops",
        )
    )


# ---------------------------------------------------------------------- sequences
# The original reptile-gen models on their sequence tasks (one inner SGD step per element,
# online objective), from conf/experiment/. A meta-step takes from seconds to minutes on
# one CPU core, so each gets a small timing budget: in quick mode no warm-up, at least one
# timed step and more only while under 20 s (the first step of a multi-second step pays
# no visible warm-up); --full warms up once and times at least 3 steps in one subprocess.
# Costs and memory quoted below were measured with 1 thread on a 2-core, 24 GB machine.
SEQUENCE_BUDGET = {
    "quick": {"warmup": 0, "min_steps": 1, "max_steps": 5, "min_time_s": 20.0, "max_time_s": 60.0},
    "full": {
        "warmup": 1,
        "min_steps": 3,
        "max_steps": 20,
        "min_time_s": 120.0,
        "max_time_s": 1200.0,
        "repeats": 1,
    },
}

#: the gradient check of the sequence workloads: 2 tasks x the first 8 elements, float64
TINY_CHECK = {
    "check_overrides": ("task.meta_batch_size=2",),
    "check_batches": prefix_batches(8),
    "check_note": "on a tiny variant: 2 tasks x the first 8 elements (float64)",
}

SINGLE_ENGINE_CHECK = (
    "only one engine is timed; the engines' (and checkpointed = full unroll) gradient "
    "equality is tested in tests/"
)

register(
    Workload(
        name="text_reptile",
        description="text Reptile, meta-batch 50 x 128 positions, 7x512 ReLU MLP "
        "(experiment=text_reptile)",
        overrides=("experiment=text_reptile",),
        engines=("functional", "higher", "lowrank"),
        budget=SEQUENCE_BUDGET,
        timeout_s=1800.0,
        **TINY_CHECK,
    )
)
register(
    Workload(
        name="text_maml",
        description="text second-order MAML, meta-batch 8 x 128 positions, full unroll, "
        "7x512 ReLU MLP (experiment=text_reptile algorithm=maml)",
        # the experiment's keys (inner lr 1e-3, outer Adam 1e-3, max_len 128) stay; only
        # the algorithm group and the meta-batch change
        overrides=("experiment=text_reptile", "algorithm=maml", "task.meta_batch_size=8"),
        engines=("functional", "higher", "lowrank"),
        baselines={"functional_graph": functional_graph_meta_loss},
        budget=SEQUENCE_BUDGET,
        **TINY_CHECK,
    )
)
register(
    Workload(
        name="mnist_reptile",
        description="MNIST Reptile, meta-batch 50 x 784 pixels, LSTM-block model "
        "(experiment=mnist_reptile)",
        overrides=("experiment=mnist_reptile",),
        engines=("functional", "higher", "lowrank"),
        budget={
            **SEQUENCE_BUDGET,
            "full": dict(SEQUENCE_BUDGET["full"], warmup=0, min_steps=2, min_time_s=0.0),
        },
        timeout_s=3600.0,
        # the whole 784-pixel step takes minutes per engine: quick mode times a prefix
        quick_batches=prefix_batches(64),
        quick_note="quick mode: the first 64 of 784 pixels of each image (64 inner "
        "steps instead of 784); --full runs whole images",
        **TINY_CHECK,
    )
)
register(
    Workload(
        name="mnist_maml_ckpt",
        description="MNIST second-order MAML, meta-batch 8 x 784 pixels, checkpointed "
        "(sqrt(784) = 28 segments), LSTM-block model (experiment=mnist_maml)",
        overrides=("experiment=mnist_maml",),
        engines=("functional", "higher", "lowrank"),
        budget=SEQUENCE_BUDGET,
        timeout_s=2400.0,
        quick_batches=prefix_batches(196),
        quick_note="quick mode: the first 196 of 784 pixels of each image (196 inner "
        "steps in ceil(sqrt(196)) = 14 checkpointed segments); --full runs whole images",
        skip={
            "higher": "no checkpointing in the higher engine, and its full 784-step "
            "unroll of 8 tasks needs ~50 GB (1 GB per task per 128 steps measured) "
            "> 24 GB RAM"
        },
        **TINY_CHECK,
    )
)
# full vs checkpointed second-order MAML where the full unroll fits: the first 128 pixels
register(
    Workload(
        name="mnist_maml_prefix128_full",
        description="MNIST second-order MAML, meta-batch 8 x the first 128 pixels, full "
        "unroll kept in memory (experiment=mnist_maml algorithm.checkpoint_segments=null)",
        overrides=("experiment=mnist_maml", "algorithm.checkpoint_segments=null"),
        engines=("functional", "higher"),
        batches=prefix_batches(128),
        budget=SEQUENCE_BUDGET,
        **TINY_CHECK,
    )
)
register(
    Workload(
        name="mnist_maml_prefix128_ckpt",
        description="MNIST second-order MAML, meta-batch 8 x the first 128 pixels, "
        "checkpointed (ceil(sqrt(128)) = 12 segments, experiment=mnist_maml)",
        overrides=("experiment=mnist_maml",),
        engines=("functional", "higher"),
        batches=prefix_batches(128),
        budget=SEQUENCE_BUDGET,
        skip={
            "higher": "no checkpointing in the higher engine (its full unroll is "
            "mnist_maml_prefix128_full / higher)"
        },
        check_grads=False,
        check_note=SINGLE_ENGINE_CHECK,
        compare_with="mnist_maml_prefix128_full",
    )
)


# ------------------------------------------------------------ the original's method
# The original reptile-gen's algorithm (per-task weight copies stepped with batched
# matmuls, benchmarks/original_method.py) against the low-rank engine on the original's
# text and MNIST models, on the same work: every text position is a real element (the
# original trains on the padding of short lines; the engines would skip padded steps).
# The ``x ref`` column of ``original_method`` is how many times slower the original's
# method is; ``speedup_vs_original`` in the JSON has the same numbers per engine.
ORIGINAL_CHECK = (
    "meta-gradient of the original's method vs the low-rank engine; " + (TINY_CHECK["check_note"])
)


def register_against_original(name: str, description: str, overrides: tuple, **options) -> None:
    """A workload timing the low-rank engine and the ``original_method`` baseline."""
    options = {"budget": SEQUENCE_BUDGET, "timeout_s": 1800.0, **TINY_CHECK, **options}
    options["check_note"] = ORIGINAL_CHECK
    register(
        Workload(
            name=name,
            description=description,
            overrides=overrides,
            engines=("lowrank",),
            baselines={"original_method": original_method_meta_loss},
            reference="lowrank",
            **options,
        )
    )


register_against_original(
    "text_reptile_real",
    "text Reptile, 50 x 128 positions all real (the original's work), 7x512 ReLU MLP "
    "(experiment=text_reptile): low-rank engine vs the original's method",
    ("experiment=text_reptile",),
    batches=all_positions_real(sample_batches),
)
register_against_original(
    "text_maml_real",
    "text second-order MAML, 8 x 128 positions all real, sqrt(N)-checkpointed "
    "(experiment=text_reptile algorithm=maml): low-rank vs the original's method",
    (
        "experiment=text_reptile",
        "algorithm=maml",
        "task.meta_batch_size=8",
        "algorithm.checkpoint_segments=auto",
    ),
    batches=all_positions_real(sample_batches),
)
register_against_original(
    "mnist_reptile_orig",
    "MNIST Reptile, 50 x 784 pixels, the original's model (experiment=mnist_reptile "
    "model=original_mnist): low-rank vs the original's method",
    ("experiment=mnist_reptile", "model=original_mnist"),
    budget={
        **SEQUENCE_BUDGET,
        "full": dict(SEQUENCE_BUDGET["full"], warmup=0, min_steps=2, min_time_s=0.0),
    },
    timeout_s=3600.0,
    quick_batches=prefix_batches(64),
    quick_note="quick mode: the first 64 of 784 pixels of each image; --full runs whole images",
)
register_against_original(
    "mnist_maml_ckpt_orig",
    "MNIST second-order MAML, 8 x 784 pixels, sqrt(N)-checkpointed, the original's model "
    "(experiment=mnist_maml model=original_mnist): low-rank vs the original's method",
    ("experiment=mnist_maml", "model=original_mnist"),
    timeout_s=2400.0,
    quick_batches=prefix_batches(196),
    quick_note="quick mode: the first 196 of 784 pixels of each image (14 checkpointed "
    "segments); --full runs whole images",
)
