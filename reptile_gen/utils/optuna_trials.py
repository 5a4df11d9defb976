"""A diverged trial of an Optuna search is a failed trial, and the study goes on.

Hydra's Optuna sweeper tells Optuna every job's return value as a completed trial; Optuna
refuses a NaN and the sweeper then ends the whole study. :class:`FailNonFiniteTrials`, a
Hydra callback that the ``hparams_search=...`` files add, wraps every study the sweeper
creates during the multirun so that a trial returning NaN or an infinity is told as
``TrialState.FAIL`` instead: the sampler never models a made-up value and the best trial
is taken among the completed ones. A diverged training run returns NaN under it
(:func:`~reptile_gen.utils.user_errors.diverged_trial_value`); its ``metrics.json`` says
``status: diverged``.
"""

from __future__ import annotations

import math

from hydra.experimental.callback import Callback

__all__ = ["FailNonFiniteTrials", "StudyFailingNonFinite"]


class StudyFailingNonFinite:
    """An Optuna study whose :meth:`tell` records a trial with a non-finite value as
    failed; everything else is the wrapped study's."""

    def __init__(self, study) -> None:
        self._study = study
        self.failed_trials: list[int] = []

    def tell(self, trial, values=None, state=None, **kwargs):
        listed = values if isinstance(values, (list, tuple)) else [values]
        if values is None or all(math.isfinite(float(v)) for v in listed):
            if state is not None:
                kwargs["state"] = state
            return self._study.tell(trial, values, **kwargs)
        import optuna

        self.failed_trials.append(getattr(trial, "number", trial))
        return self._study.tell(trial, state=optuna.trial.TrialState.FAIL)

    def __getattr__(self, name):
        return getattr(self._study, name)


class FailNonFiniteTrials(Callback):
    """Hydra callback: from the start to the end of a multirun, ``optuna.create_study``
    returns :class:`StudyFailingNonFinite` studies (``studies`` keeps them)."""

    def __init__(self) -> None:
        self.studies: list[StudyFailingNonFinite] = []
        self._create = None

    def on_multirun_start(self, config=None, **kwargs) -> None:
        try:
            import optuna
        except ImportError:  # no Optuna: nothing to wrap
            return
        create = self._create = optuna.create_study

        def create_study(*args, **kw):
            study = StudyFailingNonFinite(create(*args, **kw))
            self.studies.append(study)
            return study

        optuna.create_study = create_study

    def on_multirun_end(self, config=None, **kwargs) -> None:
        if self._create is not None:
            import optuna

            optuna.create_study = self._create
            self._create = None
