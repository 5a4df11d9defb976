"""The functional engine: pure functions of per-task parameters, batched over the tasks
(:mod:`.engine`), with its batched runner (:mod:`.runner`), hand-written reverse pass
(:mod:`.second_order`) and compiled meta-step (:mod:`.compiled`)."""

from __future__ import annotations

from reptile_gen.inner_loop.core.plan import check_truncate_steps, num_segments
from reptile_gen.inner_loop.functional.engine import PATHS, FunctionalEngine

__all__ = ["FunctionalEngine", "PATHS", "check_truncate_steps", "num_segments"]
