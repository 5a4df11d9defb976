"""The text task's report: ``samples.txt``, a few lines drawn from the trained model."""

from __future__ import annotations

from pathlib import Path

import torch

from reptile_gen.reports.common import report_or_warn
from reptile_gen.sampling import generate_text

__all__ = ["escape_text", "report_text_samples", "write_text_samples"]


def escape_text(text: str) -> str:
    """``text`` on one printable line: control characters and line breaks (``\\n``,
    ``\\x0b``, ``\\u2028``, ...) written as Python escapes, tabs kept."""
    return "".join(
        ch.encode("unicode_escape").decode("ascii")
        if ch != "\t" and (not ch.isprintable() or ch == "\\")
        else ch
        for ch in text
    )


def write_text_samples(texts: list[str], path: str | Path) -> Path:
    """One text per line, escaped by :func:`escape_text` (so a line is a sample)."""
    path = Path(path)
    path.write_text("".join(escape_text(t) + "\n" for t in texts), encoding="utf-8")
    return path


def report_text_samples(
    module, out_dir: str | Path, num_samples: int = 8, seed: int = 0, temperature: float = 1.0
) -> list[Path]:
    """``out_dir/samples.txt``: a few texts drawn from ``module`` (a warning, no file,
    when the module cannot be sampled)."""

    def make():
        generator = torch.Generator().manual_seed(seed)
        texts = generate_text(module, num_samples, temperature, generator)
        return [write_text_samples(texts, Path(out_dir) / "samples.txt")]

    return report_or_warn(make, "samples.txt")
