"""Inner-loop engines behind one interface (``algorithm.inner_loop=functional|higher|lowrank``)."""

from __future__ import annotations

from reptile_gen.inner_loop.core import (
    GRAD_MODES,
    LEARNED_LR_MODES,
    InnerLoopEngine,
    InnerLoopResult,
    InnerLR,
    InnerSchedule,
    masked_mean,
)
from reptile_gen.inner_loop.functional import FunctionalEngine
from reptile_gen.inner_loop.higher import INNER_OPTIMIZERS, HigherEngine
from reptile_gen.inner_loop.lowrank import LOWRANK_LR_MODES, LowRankEngine

__all__ = [
    "ENGINES",
    "FunctionalEngine",
    "GRAD_MODES",
    "HigherEngine",
    "INNER_OPTIMIZERS",
    "InnerLR",
    "InnerLoopEngine",
    "InnerLoopResult",
    "InnerSchedule",
    "LEARNED_LR_MODES",
    "LOWRANK_LR_MODES",
    "LowRankEngine",
    "make_engine",
    "masked_mean",
]

ENGINES = ("functional", "higher", "lowrank")


def make_engine(name: str, inner_optimizer: dict | None = None, **options) -> InnerLoopEngine:
    """Build engine ``name`` with the inner optimizer ``{name: ..., **kwargs}``.

    An option the chosen engine cannot do is a clear error, never a silent fallback.
    ``inner_lr_learned`` (the learned-rate mode the engine will run with) lets an engine
    refuse a mode it cannot carry when it is built rather than at the first step.
    """
    inner_optimizer = dict(inner_optimizer or {"name": "sgd"})
    opt_name = inner_optimizer.pop("name", "sgd")
    inner_lr_learned = options.pop("inner_lr_learned", "none")
    compile_ = options.pop("compile", False)
    if compile_ is not False and name != "functional":
        raise ValueError(
            f"algorithm.compile={compile_!r} with algorithm.inner_loop={name}: compiling "
            "the meta-step is a functional-engine option; allowed: algorithm.compile=false, "
            "or algorithm.inner_loop=functional"
        )
    if name == "lowrank":
        if opt_name != "sgd" or inner_optimizer:
            raise ValueError(
                f"algorithm.inner_optimizer={{name: {opt_name}, {inner_optimizer}}} with "
                "algorithm.inner_loop=lowrank: the low-rank engine runs plain SGD "
                "(inner_optimizer.name=sgd, no extra options); stateful inner optimizers "
                "need algorithm.inner_loop=higher"
            )
        return LowRankEngine(**options, inner_lr_learned=inner_lr_learned)
    if name == "functional":
        if opt_name != "sgd" or inner_optimizer:
            raise ValueError(
                f"algorithm.inner_optimizer={{name: {opt_name}, {inner_optimizer}}} needs "
                "algorithm.inner_loop=higher: the functional engine runs plain SGD "
                "(inner_optimizer.name=sgd, no extra options)"
            )
        return FunctionalEngine(**options, compile=compile_)
    if name == "higher":
        if opt_name not in INNER_OPTIMIZERS:
            raise ValueError(
                f"algorithm.inner_optimizer.name={opt_name!r}; allowed with "
                f"algorithm.inner_loop=higher: {', '.join(INNER_OPTIMIZERS)}"
            )
        truncate_steps = options.pop("truncate_steps", None)
        unsupported = sorted(k for k, v in options.items() if v not in (None, 1))
        if unsupported:
            raise ValueError(
                f"algorithm.inner_loop=higher does not support algorithm."
                f"{unsupported[0]}={options[unsupported[0]]!r} (a functional-engine option; "
                "use algorithm.inner_loop=functional, or leave it null)"
            )
        return HigherEngine(opt_name, inner_optimizer, truncate_steps=truncate_steps)
    raise ValueError(f"algorithm.inner_loop={name!r}; allowed: {', '.join(ENGINES)}")
