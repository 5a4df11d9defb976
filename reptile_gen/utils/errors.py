"""The error classes a user's input can raise before or around a run (no imports, so any
module may raise them without an import cycle)."""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError"]


class ConfigError(ValueError):
    """A config value that is not allowed; the message names it and what is allowed."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, or not of the configured model."""
