"""Shared by the report writers: a report that cannot be made is a warning, not a failure."""

from __future__ import annotations

import logging
from pathlib import Path

from reptile_gen.sampling import SamplingError

__all__ = ["report_or_warn"]

log = logging.getLogger("reptile_gen.reports")


def report_or_warn(make, what: str) -> list[Path]:
    """``make()``, or ``[]`` with a warning when the module cannot be sampled."""
    try:
        return make()
    except SamplingError as err:
        log.warning("no %s written: %s", what, err)
        return []
