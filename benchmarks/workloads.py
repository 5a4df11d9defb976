"""The registry of benchmark workloads.

A workload is a Hydra composition of the real ``conf/`` (task, model, algorithm and their
options) plus the engines it is timed with:

* *engines* are the values of ``algorithm.inner_loop`` (``functional``, ``higher``); the
  module is built with ``algorithm.inner_loop=<engine>`` and timed through its own
  ``meta_loss``;
* *baselines* are hand-written meta-losses (:mod:`benchmarks.baselines`) run on the module
  built with the :attr:`Workload.reference` engine (same parameters, same optimizer).

Add a workload with :func:`register` (see ``benchmarks/README.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from benchmarks.baselines import plain_loop_maml_meta_loss
from reptile_gen.data.task_batch import TaskBatch

__all__ = ["ENGINE_OVERRIDE", "Workload", "WORKLOADS", "register", "get", "sample_batches"]

#: how an engine is selected in the config
ENGINE_OVERRIDE = "algorithm.inner_loop={engine}"


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


@dataclass(frozen=True)
class Workload:
    """One thing to time.

    Attributes:
        name: registry key (``--workloads``).
        description: one line for the report.
        overrides: Hydra overrides on ``conf/config.yaml`` (the engine's is added).
        engines: ``algorithm.inner_loop`` values to time.
        baselines: hand-written meta-losses ``(module, batch) -> (loss, logs)`` by name,
            run on the module built with ``reference``.
        reference: the engine the ratios are taken against and the baselines' gradients
            are checked against.
        batches: ``(datamodule, num_batches, seed) -> [TaskBatch]``, the meta-batches the
            steps cycle through (sampled before timing starts).
        check_grads: compare every engine's and baseline's meta-gradient with the
            reference's (float64) before timing.
        min_time_s: optional per-workload override of the timing budget (slow workloads).
    """

    name: str
    description: str
    overrides: tuple[str, ...]
    engines: tuple[str, ...] = ("functional", "higher")
    baselines: dict[str, Callable] = field(default_factory=dict)
    reference: str = "functional"
    batches: Callable[..., list[TaskBatch]] = sample_batches
    check_grads: bool = True
    min_time_s: float | None = None

    @property
    def all_engines(self) -> tuple[str, ...]:
        return self.engines + tuple(self.baselines)

    def overrides_for(self, engine: str) -> list[str]:
        """The full override list of ``engine`` (a baseline uses the reference engine)."""
        built_with = self.reference if engine in self.baselines else engine
        return [*self.overrides, ENGINE_OVERRIDE.format(engine=built_with)]


WORKLOADS: dict[str, Workload] = {}


def register(workload: Workload) -> Workload:
    if workload.name in WORKLOADS:
        raise ValueError(f"workload {workload.name!r} is registered twice")
    if workload.reference not in workload.engines:
        raise ValueError(f"workload {workload.name!r}: reference engine not in its engines")
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
            baselines={"plain_loop": plain_loop_maml_meta_loss},
        )
    )
