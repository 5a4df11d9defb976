"""Hydra's Optuna sweeper, with a trial that returns a non-finite value recorded as a
failed trial (``TrialState.FAIL``) while the study goes on.

Hydra's Optuna sweeper tells Optuna every job's return value as a completed trial; Optuna
refuses a NaN, and the sweeper then ends the whole study. A diverged training run (exit
status 3 outside a sweep, see :mod:`reptile_gen.inner_loop.core.guard`) returns NaN under
this sweeper, so its trial is failed: the sampler never models a made-up value, the best
trial is taken among the completed ones, and the trial's ``metrics.json`` says
``status: diverged``. Selected by ``hparams_search=...`` files with
``hydra.sweeper._target_:
hydra_plugins.reptile_gen_optuna.sweeper.DivergenceAwareOptunaSweeper``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import optuna
from hydra_plugins.hydra_optuna_sweeper import optuna_sweeper

__all__ = ["DivergenceAwareOptunaSweeper", "FailNonFiniteTrials", "failing_non_finite_trials"]


class FailNonFiniteTrials:
    """A study whose :meth:`tell` records a trial with a non-finite value as failed;
    everything else is the wrapped study's."""

    def __init__(self, study: optuna.Study) -> None:
        self._study = study
        self.failed_trials: list[int] = []

    def tell(self, trial, values=None, state=None, **kwargs):
        finite = values is None or all(math.isfinite(float(v)) for v in _as_list(values))
        if finite:
            if state is not None:
                kwargs["state"] = state
            return self._study.tell(trial, values, **kwargs)
        number = getattr(trial, "number", trial)
        self.failed_trials.append(number)
        return self._study.tell(trial, state=optuna.trial.TrialState.FAIL)

    def __getattr__(self, name):
        return getattr(self._study, name)


def _as_list(values) -> list:
    return list(values) if isinstance(values, (list, tuple)) else [values]


@contextlib.contextmanager
def failing_non_finite_trials() -> Iterator[list[FailNonFiniteTrials]]:
    """While active, every study ``optuna.create_study`` makes is wrapped in
    :class:`FailNonFiniteTrials` (the list yielded collects them)."""
    made: list[FailNonFiniteTrials] = []
    create = optuna.create_study

    def create_study(*args, **kwargs):
        study = FailNonFiniteTrials(create(*args, **kwargs))
        made.append(study)
        return study

    optuna.create_study = create_study
    try:
        yield made
    finally:
        optuna.create_study = create


class DivergenceAwareOptunaSweeper(optuna_sweeper.OptunaSweeper):
    """Hydra's Optuna sweeper (same options) where a trial returning NaN or an infinity
    is a failed trial and the study goes on."""

    def sweep(self, arguments: list[str]) -> None:
        with failing_non_finite_trials():
            return super().sweep(arguments)
