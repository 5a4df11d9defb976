"""The ``higher`` engine: ``higher.innerloop_ctx`` one task at a time (any inner
optimizer ``higher`` differentiates through)."""

from __future__ import annotations

from reptile_gen.inner_loop.higher.engine import INNER_OPTIMIZERS, HigherEngine

__all__ = ["HigherEngine", "INNER_OPTIMIZERS"]
