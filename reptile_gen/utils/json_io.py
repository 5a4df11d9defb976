"""Strict JSON for every file the project writes: NaN and +-inf become ``null`` (the
JSON standard has no token for them; Python's ``json`` would write ``NaN``/``Infinity``,
which other readers reject)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["dumps", "write_json", "strict"]


def strict(value: Any) -> Any:
    """``value`` with every non-finite float (also inside lists, tuples and dicts, and
    0-d tensors/arrays via ``.item()``) replaced by ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return strict(value.item())
    return value


def dumps(value: Any, **kwargs) -> str:
    """``json.dumps`` of :func:`strict` ``(value)``; refuses any leftover NaN/inf."""
    return json.dumps(strict(value), allow_nan=False, **kwargs)


def write_json(path: str | Path, value: Any, indent: int | None = 2) -> Path:
    """Write ``value`` as strict JSON (newline-terminated) to ``path``; returns the path."""
    path = Path(path)
    path.write_text(dumps(value, indent=indent) + "\n")
    return path
