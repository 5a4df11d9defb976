"""The project's error classes: those a user's input can raise before or around a run,
and a diverged run (no imports of the package, so any module may raise them without an
import cycle)."""

from __future__ import annotations

import re

__all__ = ["CheckpointError", "ConfigError", "Diverged", "UserError"]


class UserError(ValueError):
    """An error the user can fix: the message starts ``key=value: what is wrong`` and
    ends with what is allowed (the entry points print it as one line and exit 2)."""


class ConfigError(UserError):
    """A config value that is not allowed; the message names it and what is allowed."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used: unreadable, or not of the configured model."""


#: a :class:`Diverged` line in the traceback text of a spawned DDP rank
_SPAWNED = re.compile(r"Diverged: (diverged at meta-step (\d+): non-finite ([^\n]*))")


class Diverged(ArithmeticError):
    """Training (or sampling, ``meta_step=None``) produced a non-finite value;
    ``meta_step`` is the step it appeared at (no optimizer step was taken with it).
    Raised by the divergence guard (:mod:`reptile_gen.inner_loop.core.guard`)."""

    def __init__(self, what: str, meta_step: int | None, detail: str = "", rates: str = "") -> None:
        self.what = what
        self.meta_step = None if meta_step is None else int(meta_step)
        self.detail = detail
        self.rates = rates
        where = "" if self.meta_step is None else f" at meta-step {self.meta_step}"
        parts = [f"diverged{where}: non-finite {what}"]
        if detail:
            parts.append(detail)
        if rates:
            parts.append(f"inner rates {rates}")
        super().__init__("; ".join(parts))

    def __reduce__(self):  # picklable across DDP ranks with its fields
        return (type(self), (self.what, self.meta_step, self.detail, self.rates))

    def as_record(self) -> dict:
        """The fields ``metrics.json`` keeps for a diverged run."""
        return {
            "status": "diverged",
            "diverged_at_step": self.meta_step,
            "diverged_value": self.what,
            "error": str(self),
        }

    @classmethod
    def from_text(cls, text: str) -> Diverged | None:
        """The training divergence whose line ``text`` holds (a spawned DDP rank's error
        reaches the main process as its traceback text), or None."""
        match = _SPAWNED.search(text)
        if match is None:
            return None
        rest, found, rates = match.group(3).rpartition("; inner rates ")
        if not found:
            rest, rates = rates, ""
        what, _, detail = rest.partition("; ")
        return cls(what.strip(), int(match.group(2)), detail, rates)
