"""The error classes a user's input can raise before or around a run (no imports, so any
module may raise them without an import cycle)."""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "UserError"]


class UserError(ValueError):
    """An error the user can fix: the message starts ``key=value: what is wrong`` and
    ends with what is allowed (the entry points print it as one line and exit 2)."""


class ConfigError(UserError):
    """A config value that is not allowed; the message names it and what is allowed."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used: unreadable, or not of the configured model."""
