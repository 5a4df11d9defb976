"""Old path of the engine interface; it lives in :mod:`reptile_gen.inner_loop.core`."""

from __future__ import annotations

from reptile_gen.inner_loop.core.plan import first_visit, last_active_step
from reptile_gen.inner_loop.core.result import (
    InnerLoopEngine,
    InnerLoopResult,
    LossFn,
    masked_mean,
)

__all__ = [
    "InnerLoopEngine",
    "InnerLoopResult",
    "LossFn",
    "first_visit",
    "last_active_step",
    "masked_mean",
]
