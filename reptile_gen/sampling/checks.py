"""What the sampler can replay, and its options, checked with clear errors."""

from __future__ import annotations

import math

from reptile_gen.inner_loop import ENGINES, LOWRANK_LR_MODES
from reptile_gen.utils.errors import UserError

__all__ = [
    "SAMPLING_PATHS",
    "SamplingError",
    "check_num_samples",
    "check_path",
    "check_sampleable",
    "check_temperature",
    "sampling_path",
]

#: SGD keyword arguments that leave plain SGD unchanged
_PLAIN_SGD = {"momentum": 0, "dampening": 0, "weight_decay": 0, "nesterov": False}
#: the task kinds (``TaskSpec.kind``) the sampler draws sequences of
SAMPLED_KINDS = ("text", "image")
#: how the sampler holds the samples' inner loops (``OnlineSampler(path=...)``, the sample
#: app's ``path=``): auto, per-sample weight copies, or the low-rank engine's form
SAMPLING_PATHS = ("auto", "weights", "lowrank")


class SamplingError(UserError):
    """A checkpoint or an option that sampling cannot work with; the message says why."""


def check_sampleable(module) -> None:
    """A clear :class:`SamplingError` unless ``module`` is a sequence model whose inner
    loop is plain SGD (what the sampler replays).

    The module says what it is through public attributes: ``has_inner_loop`` (False for
    the LSTM baseline), its ``engine`` (``engine.name`` one of the registered engines,
    ``engine.inner_optimizer`` / ``inner_optimizer_kwargs`` when it has a choice of inner
    optimizer) and its ``task_spec``.
    """
    engine = getattr(module, "engine", None)
    if not getattr(module, "has_inner_loop", True) or engine is None:
        raise SamplingError(
            f"cannot sample a {type(module).__name__} checkpoint: the sampler replays the "
            "inner SGD loop of a meta-learned sequence model (algorithm=maml, fomaml, "
            "reptile or joint), and this module has no such inner loop (e.g. the LSTM "
            "baseline, algorithm=lstm)"
        )
    spec = module.task_spec
    if spec.kind not in SAMPLED_KINDS or not getattr(module, "is_sequence_model", False):
        raise SamplingError(
            f"sampling needs a sequence task: text, mnist or digits (this checkpoint's task "
            f"is {spec.name!r}, a few-shot task, not a sequence model)"
        )
    if spec.output_kind not in ("classes", "bits"):
        raise SamplingError(
            f"sampling needs discrete outputs (classes or bits); task {spec.name!r} has "
            f"output_kind={spec.output_kind!r}"
        )
    name = getattr(engine, "name", type(engine).__name__)
    if name not in ENGINES:
        raise SamplingError(
            f"cannot sample with inner-loop engine {name!r}: only plain SGD is replayed "
            f"(engines: {', '.join(ENGINES)})"
        )
    optimizer = getattr(engine, "inner_optimizer", "sgd")
    kwargs = dict(getattr(engine, "inner_optimizer_kwargs", None) or {})
    plain = optimizer == "sgd" and all(
        k in _PLAIN_SGD and v == _PLAIN_SGD[k] for k, v in kwargs.items()
    )
    if not plain:
        shown = ", ".join([f"name: {optimizer}"] + [f"{k}: {v}" for k, v in kwargs.items()])
        raise SamplingError(
            f"this checkpoint's inner optimizer is algorithm.inner_optimizer={{{shown}}}: "
            "the sampler replays the inner loop as plain SGD (the functional engine's "
            "dynamics) and does not replay other inner optimizers; sample a checkpoint "
            "trained with algorithm.inner_optimizer.name=sgd (no momentum or weight decay)"
        )


def check_task_kind(module, kind: str, what: str) -> None:
    """A clear :class:`SamplingError` unless ``module``'s task is of ``kind``."""
    spec = module.task_spec
    if spec.kind != kind:
        raise SamplingError(
            f"{what} sampling needs a {what} checkpoint "
            f"({'task=text' if kind == 'text' else 'task=mnist or digits'}); this one's "
            f"task is {spec.name!r}"
        )


def check_temperature(temperature) -> float:
    """``temperature`` as a float if it is a finite number > 0."""
    ok = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    if not ok or not math.isfinite(temperature) or temperature <= 0:
        raise SamplingError(
            f"temperature={temperature!r}; must be a number > 0 and finite (1.0: the model's own "
            "distribution; smaller: closer to the most likely element)"
        )
    return float(temperature)


def check_num_samples(num_samples) -> int:
    """``num_samples`` if it is an integer >= 1."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise SamplingError(f"num_samples={num_samples!r}; must be an integer >= 1")
    return num_samples


def check_path(path) -> str:
    """``path`` (the sampler's, the sample app's ``path=``) if it is one of
    :data:`SAMPLING_PATHS` (a clear error otherwise)."""
    if path not in SAMPLING_PATHS:
        raise SamplingError(
            f"path={path!r}; allowed: {', '.join(SAMPLING_PATHS)} (how the samples' inner "
            "loops are held)"
        )
    return path


def _lowrank_refusal(module) -> str | None:
    """Why the low-rank path cannot replay ``module``'s inner loop (None: it can)."""
    learned = module.inner_lr.learned
    if learned not in LOWRANK_LR_MODES:
        return (
            f"this checkpoint's inner rates are algorithm.inner_lr_learned={learned}, and a "
            "per-parameter rate matrix does not factor out of the low-rank update"
        )
    if module.inner_lr.momentum:
        return (
            f"this checkpoint's inner SGD has momentum (algorithm.inner_momentum="
            f"{module.inner_lr.momentum:g}): its velocity is not a rank-one history"
        )
    if module.task_spec.prev_input and module.train_schedule.inner_batch_size > 1:
        return (
            "with task.prev_input=true and algorithm.inner_batch_size="
            f"{module.train_schedule.inner_batch_size} each draw within a step is the next "
            "element's input, which the low-rank step does not replay"
        )
    return None


def sampling_path(module, path: str = "auto") -> str:
    """The path the sampler takes for ``module``: ``weights`` or ``lowrank``.

    ``auto`` is ``lowrank`` wherever the low-rank path can replay the module's inner loop,
    whatever engine trained it: both paths give the same samples, and the low-rank one is
    faster (3x on the digits MLP, ~5x on 784-pixel MNIST with the original's model:
    docs/benchmarks.md); ``weights`` otherwise. ``lowrank`` that the module cannot take is
    a clear :class:`SamplingError` naming ``path=weights``.
    """
    if check_path(path) == "weights":
        return path
    refusal = _lowrank_refusal(module)
    if refusal is None:
        return "lowrank"
    if path == "lowrank":
        raise SamplingError(
            f"path=lowrank: {refusal}; sample it with path=weights (per-sample weight "
            "copies, any plain SGD inner loop)"
        )
    return "weights"
