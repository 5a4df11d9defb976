"""The exact low-rank engine (``engine=lowrank``): per-task weights as shared initial
weights plus each task's history of rank-one updates (:mod:`.engine`)."""

from __future__ import annotations

from reptile_gen.inner_loop.lowrank.engine import LOWRANK_LR_MODES, LowRankEngine

__all__ = ["LOWRANK_LR_MODES", "LowRankEngine"]
