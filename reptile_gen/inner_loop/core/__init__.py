"""What every inner-loop engine shares (the SGD update, rates, the run plan, losses)."""

from __future__ import annotations

from reptile_gen.inner_loop.core.update import sgd_update

__all__ = ["sgd_update"]
