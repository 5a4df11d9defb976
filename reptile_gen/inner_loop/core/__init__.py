"""What every inner-loop engine shares: the SGD update (plain or with momentum), the
rates, the run plan, the losses by output kind, the batched layers, segment
recomputation and the result."""

from __future__ import annotations

from reptile_gen.inner_loop.core.plan import (
    GRAD_MODES,
    InnerSchedule,
    check_truncate_steps,
    first_order_before,
    first_visit,
    last_active_step,
    num_segments,
    segment_bounds,
    step_weights,
    steps_with_data,
)
from reptile_gen.inner_loop.core.rates import (
    LEARNED_LR_MODES,
    LR_SCHEDULES,
    PER_STEP_MODES,
    InnerLR,
    RateSlots,
    StepRates,
    per_step_rates,
    split_rates,
    unit_shape,
)
from reptile_gen.inner_loop.core.result import (
    InnerLoopEngine,
    InnerLoopResult,
    LossFn,
    masked_mean,
)
from reptile_gen.inner_loop.core.update import (
    check_momentum,
    momentum_step,
    momentum_update,
    sgd_step,
    sgd_update,
    sgd_update_list,
)

__all__ = [
    "GRAD_MODES",
    "InnerLR",
    "InnerLoopEngine",
    "InnerLoopResult",
    "InnerSchedule",
    "LEARNED_LR_MODES",
    "LR_SCHEDULES",
    "PER_STEP_MODES",
    "LossFn",
    "RateSlots",
    "StepRates",
    "check_momentum",
    "check_truncate_steps",
    "first_order_before",
    "first_visit",
    "last_active_step",
    "masked_mean",
    "momentum_step",
    "momentum_update",
    "num_segments",
    "per_step_rates",
    "segment_bounds",
    "sgd_step",
    "sgd_update",
    "sgd_update_list",
    "split_rates",
    "step_weights",
    "steps_with_data",
    "unit_shape",
]
