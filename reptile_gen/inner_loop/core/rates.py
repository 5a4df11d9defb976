"""Inner learning rates: fixed, scheduled over the inner steps, or meta-learned (one object
for every engine).

Learning-rate convention: ``inner_lr`` is the step size of each task's own SGD, applied to
that task's loss (the mean over the elements of one inner step). It is never scaled by
the meta-batch size or by the number of tasks.

The rate of inner step ``i`` of parameter tensor ``n`` is

    rate(i, n) = base(n) [bucket(i)] * factor(i)

* ``base`` is ``inner_lr`` (fixed) or a learned tensor (``inner_lr_learned``): one
  scalar, one per tensor, one per weight, one per output unit (``per_unit``: a weight
  ``(out, in)`` has rates ``(out, 1)``, a bias ``(out,)`` has ``(out,)``, any other tensor
  one rate per index of its first axis, :func:`unit_shape`), or, for the per-step modes,
  a leading axis of ``K`` buckets (``per_step``: ``[K]`` shared by every tensor;
  ``per_layer_per_step``: ``[K]`` per tensor), initialised to ``inner_lr``;
* ``factor`` is the fixed schedule (``inner_lr_schedule``): 1 (constant), a linear,
  cosine or exponential ramp from 1 at the first step to ``inner_lr_end_factor`` at the
  last step of the horizon, or a list of factors over equal buckets of the horizon;
* the *horizon* ``H`` is the number of inner steps of a training run (few-shot: the
  training ``inner_steps``; sequences: the positions divided by ``inner_batch_size``),
  or, when not known beforehand, each run's own step count. A step past the horizon
  (evaluation with more adaptation steps than training) keeps the last step's rate, so
  the first ``H`` steps of any run take the rates they were trained with. Bucket ``k``
  of ``K`` holds the steps ``i`` with ``floor(i * K / H) = k``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from reptile_gen.inner_loop.core.update import check_momentum

__all__ = [
    "InnerLR",
    "LEARNED_LR_MODES",
    "LR_SCHEDULES",
    "PER_STEP_MODES",
    "RateSlots",
    "StepRates",
    "check_schedule",
    "per_step_rates",
    "schedule_factors",
    "split_rates",
    "unit_shape",
]

LEARNED_LR_MODES = (
    "none",
    "scalar",
    "per_tensor",
    "per_parameter",
    "per_step",
    "per_layer_per_step",
    "per_unit",
)
#: learned modes whose rates change along the inner loop (a leading axis of buckets)
PER_STEP_MODES = ("per_step", "per_layer_per_step")
#: named fixed schedules of ``inner_lr_schedule`` (a list of factors is the other form)
LR_SCHEDULES = ("constant", "linear", "cosine", "exp")


def _key(name: str) -> str:
    return name.replace(".", "__")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def unit_shape(shape) -> tuple[int, ...]:
    """The shape of a ``per_unit`` rate of a parameter of ``shape``: one rate per index of
    the first axis (a weight's output unit), broadcast over the others (``(out, in)`` ->
    ``(out, 1)``, ``(out,)`` -> ``(out,)``, a scalar -> ``()``)."""
    shape = tuple(shape)
    return (shape[0],) + (1,) * (len(shape) - 1) if shape else ()


def check_schedule(schedule, end_factor) -> str | tuple[float, ...]:
    """``inner_lr_schedule`` as a name or a tuple of factors (a clear error otherwise)."""
    if isinstance(schedule, str):
        if schedule not in LR_SCHEDULES:
            raise ValueError(
                f"algorithm.inner_lr_schedule={schedule!r}; allowed: "
                f"{', '.join(LR_SCHEDULES)}, or a list of factors >= 0"
            )
    elif isinstance(schedule, Sequence) and schedule and all(_is_number(f) for f in schedule):
        if any(f < 0 for f in schedule) or not any(f > 0 for f in schedule):
            raise ValueError(
                f"algorithm.inner_lr_schedule={list(schedule)!r}: the factors must be >= 0, "
                "not all zero"
            )
        schedule = tuple(float(f) for f in schedule)
    else:
        raise ValueError(
            f"algorithm.inner_lr_schedule={schedule!r}; allowed: "
            f"{', '.join(LR_SCHEDULES)}, or a non-empty list of factors >= 0"
        )
    exp = schedule == "exp"
    if not _is_number(end_factor) or end_factor < 0 or (exp and end_factor == 0):
        bound = "> 0 (exp)" if exp else ">= 0"
        raise ValueError(f"algorithm.inner_lr_end_factor={end_factor!r}; must be a number {bound}")
    return schedule


def per_step_rates(learned: str | None, schedule) -> bool:
    """Whether ``inner_lr_learned`` and ``inner_lr_schedule`` (config values) give rates
    that change along the inner loop (what an engine checks when it is built)."""
    return learned in PER_STEP_MODES or (schedule or "constant") != "constant"


def schedule_factors(schedule, end_factor: float, horizon: int) -> list[float]:
    """The fixed factor of each of the ``horizon`` steps (see the module docstring)."""
    schedule = check_schedule(schedule, end_factor)
    if isinstance(schedule, tuple):
        return [schedule[i * len(schedule) // horizon] for i in range(horizon)]
    if schedule == "constant" or horizon == 1:
        return [1.0] * horizon
    e = float(end_factor)
    out = []
    for i in range(horizon):
        u = i / (horizon - 1)
        if schedule == "linear":
            out.append(1.0 + (e - 1.0) * u)
        elif schedule == "cosine":
            out.append(e + (1.0 - e) * 0.5 * (1.0 + math.cos(math.pi * u)))
        else:
            out.append(e**u)
    return out


@dataclass(frozen=True)
class StepRates:
    """How the steps of one run take their rates from the base rates: ``factors[i]`` (the
    fixed schedule) and ``buckets[i]`` (the index into a per-step learned rate's leading
    axis; None when no rate has one)."""

    factors: tuple[float, ...]
    buckets: tuple[int, ...] | None = None

    @property
    def constant(self) -> bool:
        """Every step takes the base rates unchanged."""
        return self.buckets is None and all(f == 1.0 for f in self.factors)

    def at(self, base: dict, step: int) -> dict:
        """``{name: rate}`` of step ``step`` from the base rates ``{name: float or
        tensor}`` (the base itself when the rates do not change along the loop)."""
        if self.constant:
            return base
        f = self.factors[step]
        b = None if self.buckets is None else self.buckets[step]
        out = {}
        for name, r in base.items():
            if torch.is_tensor(r):
                if b is not None:
                    r = r[b]
                out[name] = r if f == 1.0 else r * f
            else:
                out[name] = r * f
        return out

    def base_grad(self, step: int, grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The gradient w.r.t. a base rate tensor ``like`` of step ``step``'s rate, given
        the gradient ``grad`` w.r.t. that step's rate (shaped like ``at``'s value)."""
        f = self.factors[step]
        if f != 1.0:
            grad = grad * f
        if self.buckets is None:
            return grad
        out = like.new_zeros(like.shape)
        out[self.buckets[step]] = grad
        return out


class InnerLR(nn.Module):
    """Inner learning rates, fixed, scheduled or meta-learned, and the inner step's
    momentum (Meta-SGD, Li et al. 2017;
    per-step rates as in Meta-SGD's and MAML++'s per-step learning rates, Antoniou et al.
    2019).

    Args:
        names_and_shapes: ``(name, shape)`` of each adapted parameter.
        init: the initial (or fixed) learning rate, > 0.
        learned: ``none`` (a fixed float), ``scalar`` (one learned rate), ``per_tensor``
            (one per parameter tensor), ``per_parameter`` (one per weight, Meta-SGD),
            ``per_step`` (one per bucket of steps), ``per_layer_per_step`` (one per
            parameter tensor per bucket of steps) or ``per_unit`` (one per output unit of
            each tensor, :func:`unit_shape`: how plastic each unit is).
        schedule: fixed factor of each step: ``constant``, ``linear``, ``cosine``, ``exp``
            (1 at the first step, ``end_factor`` at the horizon's last) or a list of
            factors over equal buckets of the horizon. It multiplies the learned rates too.
        end_factor: the last step's factor for ``linear``, ``cosine`` and ``exp``.
        buckets: per-step modes: the number ``K`` of learned rates along the loop (None:
            one per step of the horizon).
        horizon: inner steps of a training run (None: each run's own step count).
        momentum: the inner SGD's heavy-ball momentum ``beta`` in ``[0, 1)`` (0: plain
            SGD): every engine that runs it, and the sampler, take the step
            :func:`~reptile_gen.inner_loop.core.update.momentum_step` with these rates.
    """

    def __init__(
        self,
        names_and_shapes,
        init: float,
        learned: str = "none",
        schedule: str | Sequence[float] = "constant",
        end_factor: float = 0.1,
        buckets: int | None = None,
        horizon: int | None = None,
        momentum: float = 0.0,
    ) -> None:
        super().__init__()
        self.momentum = check_momentum(momentum)
        if learned not in LEARNED_LR_MODES:
            raise ValueError(
                f"inner_lr_learned={learned!r}; allowed: {', '.join(LEARNED_LR_MODES)}"
            )
        self.schedule = check_schedule(schedule, end_factor)
        self.end_factor = float(end_factor)
        if horizon is not None and (
            isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1
        ):
            raise ValueError(f"inner-rate horizon={horizon!r}; must be an integer >= 1")
        self.horizon = horizon
        if isinstance(self.schedule, tuple) and horizon is not None and len(schedule) > horizon:
            raise ValueError(
                f"algorithm.inner_lr_schedule={list(schedule)!r}: {len(schedule)} factors for "
                f"the {horizon} inner steps of a run; allowed: at most {horizon} factors"
            )
        self.init = float(init)
        self.learned = learned
        self.names = [n for n, _ in names_and_shapes]
        self.buckets = self._check_buckets(buckets)
        if learned == "scalar":
            self.scalar = nn.Parameter(torch.tensor(self.init))
        elif learned == "per_step":
            self.steps = nn.Parameter(torch.full((self.buckets,), self.init))
        elif learned in ("per_tensor", "per_parameter", "per_layer_per_step", "per_unit"):

            def shape(s):
                if learned == "per_unit":
                    return unit_shape(s)
                return {"per_tensor": (), "per_parameter": tuple(s)}.get(learned, (self.buckets,))

            self.rates = nn.ParameterDict(
                {
                    _key(n): nn.Parameter(torch.full(shape(s), self.init))
                    for n, s in names_and_shapes
                }
            )

    def _check_buckets(self, buckets) -> int | None:
        if self.learned not in PER_STEP_MODES:
            if buckets is not None:
                raise ValueError(
                    f"algorithm.inner_lr_buckets={buckets!r} with inner_lr_learned="
                    f"{self.learned}: buckets split the inner steps among per-step learned "
                    "rates; allowed: null, or inner_lr_learned=per_step|per_layer_per_step"
                )
            return None
        if buckets is None:
            if self.horizon is None:
                raise ValueError(
                    f"algorithm.inner_lr_buckets=null with inner_lr_learned={self.learned}: "
                    "the number of inner steps is not known before the run; allowed: an "
                    "integer >= 1"
                )
            return self.horizon
        if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
            raise ValueError(
                f"algorithm.inner_lr_buckets={buckets!r}; must be null or an integer >= 1"
            )
        if self.horizon is not None and buckets > self.horizon:
            raise ValueError(
                f"algorithm.inner_lr_buckets={buckets}: more buckets than the {self.horizon} "
                f"inner steps of a run; allowed: 1 to {self.horizon} (or null: one per step)"
            )
        return buckets

    @property
    def is_learned(self) -> bool:
        return self.learned != "none"

    @property
    def per_step(self) -> bool:
        """Whether the rates change along the inner loop (a schedule or per-step modes)."""
        return self.learned in PER_STEP_MODES or self.schedule != "constant"

    def rates_by_name(self) -> dict[str, torch.Tensor | float]:
        """The base learning rate of each adapted parameter (a float, or a tensor that
        broadcasts; per-step modes: with a leading axis of buckets). The rate of a step
        is :meth:`step_rates` applied to it."""
        if self.learned == "none":
            return dict.fromkeys(self.names, self.init)
        if self.learned == "scalar":
            return dict.fromkeys(self.names, self.scalar)
        if self.learned == "per_step":
            return dict.fromkeys(self.names, self.steps)
        return {n: self.rates[_key(n)] for n in self.names}

    def step_rates(self, num_steps: int) -> StepRates:
        """How each of a run's ``num_steps`` steps takes its rates from the base rates."""
        horizon = self.horizon or max(num_steps, 1)
        within = [min(i, horizon - 1) for i in range(num_steps)]
        if self.schedule == "constant":
            factors = (1.0,) * num_steps
        else:
            table = schedule_factors(self.schedule, self.end_factor, horizon)
            factors = tuple(table[i] for i in within)
        buckets = None
        if self.learned in PER_STEP_MODES:
            k = self.buckets
            buckets = tuple(min(i * k // horizon, k - 1) for i in within)
        return StepRates(factors, buckets)

    def extra_repr(self) -> str:
        extra = ""
        if self.schedule != "constant":
            extra += f", schedule={self.schedule}, end_factor={self.end_factor}"
        if self.buckets is not None:
            extra += f", buckets={self.buckets}"
        if self.momentum:
            extra += f", momentum={self.momentum}"
        return f"learned={self.learned}, init={self.init}{extra}"


def split_rates(rates: dict) -> tuple[list[torch.Tensor], dict[str, int | None]]:
    """Learned rates (tensors) become explicit inputs, so that a checkpointed segment can
    return their gradients; fixed ones stay floats. Returns the distinct rate tensors in
    first-seen order and, per parameter name, the index of its rate tensor (None for a
    fixed rate)."""
    tensors = list(dict.fromkeys(r for r in rates.values() if torch.is_tensor(r)))
    index = {id(t): i for i, t in enumerate(tensors)}
    return tensors, {k: index[id(r)] if torch.is_tensor(r) else None for k, r in rates.items()}


class RateSlots:
    """``{name: rate}`` split into the learned rate tensors (explicit inputs of a
    checkpointed segment, which returns their gradients) and the fixed floats, with the
    run's :class:`StepRates` (how each step's rates follow from them).

    Attributes:
        tensors: the distinct learned rate tensors, in first-seen order.
        slots: per parameter name, the index of its rate in ``tensors`` (None: fixed).
        fixed: the fixed rates by name.
        steps: the run's :class:`StepRates` (None: the same rates at every step).
    """

    def __init__(self, rates: dict, steps: StepRates | None = None) -> None:
        self.tensors, self.slots = split_rates(rates)
        self.fixed = {k: r for k, r in rates.items() if not torch.is_tensor(r)}
        self.steps = None if steps is None or steps.constant else steps

    def rate(self, name: str, tensors):
        """The base rate of ``name``, a learned one taken from ``tensors``."""
        slot = self.slots[name]
        return self.fixed[name] if slot is None else tensors[slot]

    def rates(self, tensors, step: int | None = None) -> dict:
        """``{name: rate}`` with the learned rates taken from ``tensors``: the base rates,
        or with ``step`` the rates of that step."""
        base = {k: self.rate(k, tensors) for k in self.slots}
        if step is None or self.steps is None:
            return base
        return self.steps.at(base, step)
