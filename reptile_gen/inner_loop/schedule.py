"""Old path of the schedules and rates; they live in :mod:`reptile_gen.inner_loop.core`."""

from __future__ import annotations

from reptile_gen.inner_loop.core.plan import GRAD_MODES, InnerSchedule
from reptile_gen.inner_loop.core.rates import LEARNED_LR_MODES, InnerLR, split_rates

__all__ = ["InnerSchedule", "InnerLR", "LEARNED_LR_MODES", "GRAD_MODES", "split_rates"]
