"""Inner-loop engines behind one interface (``engine=functional|higher|lowrank``): what
they share is in :mod:`.core`, each engine in its own folder."""

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

#: the engines by name (``engine=<name>``): adding one is a folder and a line here
ENGINES: dict[str, type[InnerLoopEngine]] = {}
ENGINES["functional"] = FunctionalEngine
ENGINES["higher"] = HigherEngine
ENGINES["lowrank"] = LowRankEngine


def make_engine(name: str, inner_optimizer: dict | None = None, **options) -> InnerLoopEngine:
    """Build engine ``name`` with the inner optimizer ``{name: ..., **kwargs}``.

    ``options``: chunk_size, checkpoint_segments, truncate_steps, inner_lr_learned (the
    learned-rate mode the engine will run with, so that an engine refuses a mode it cannot
    carry when it is built), inner_lr_schedule (likewise, the fixed rate schedule),
    inner_momentum (likewise, the inner SGD's momentum), compile. Each engine checks its
    own options
    (:meth:`InnerLoopEngine.from_options`): one it cannot do is a clear error, never a
    silent fallback.
    """
    engine = ENGINES.get(name)
    if engine is None:
        raise ValueError(f"engine={name!r}; allowed: {', '.join(ENGINES)}")
    inner_optimizer = dict(inner_optimizer or {"name": "sgd"})
    opt_name = inner_optimizer.pop("name", "sgd")
    return engine.from_options(opt_name, inner_optimizer, options)
