"""The text task's report: ``samples.txt``, a few lines drawn from the trained model, and,
when given the untrained model, ``samples_untrained.txt`` drawn the same way; for a
corpus with a line check (:data:`reptile_gen.data.corpora.LINE_CHECKS`),
``samples_check.json``: the share of each model's samples that parse like the corpus's
lines."""

from __future__ import annotations

from pathlib import Path

import torch

from reptile_gen.data.corpora import LINE_CHECKS, share_passing
from reptile_gen.reports.common import report_or_warn
from reptile_gen.sampling import generate_text
from reptile_gen.utils.json_io import write_json

__all__ = ["escape_text", "report_text_samples", "write_text_samples"]

#: samples drawn per model for a corpus with a line check (more than the default 8, so
#: the share that parses means something)
CHECKED_SAMPLES = 16


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
    module,
    out_dir: str | Path,
    num_samples: int = 8,
    seed: int = 0,
    temperature: float = 1.0,
    untrained=None,
    corpus: str | None = None,
) -> list[Path]:
    """``out_dir/samples.txt``: a few texts drawn from ``module`` (a warning, no file,
    when the module cannot be sampled); ``samples_untrained.txt`` from ``untrained``
    (same seed) when given; ``samples_check.json`` when ``corpus`` has a line check."""
    out_dir = Path(out_dir)
    if corpus in LINE_CHECKS:
        num_samples = max(num_samples, CHECKED_SAMPLES)

    def draw(model) -> list[str]:
        generator = torch.Generator().manual_seed(seed)
        return generate_text(model, num_samples, temperature, generator)

    def make():
        texts = draw(module)
        written = [write_text_samples(texts, out_dir / "samples.txt")]
        check = {"corpus": corpus, "num_samples": num_samples}
        check["trained_share"] = share_passing(texts, corpus)
        if untrained is not None:
            before = draw(untrained)
            written.append(write_text_samples(before, out_dir / "samples_untrained.txt"))
            check["untrained_share"] = share_passing(before, corpus)
        if corpus in LINE_CHECKS:
            written.append(write_json(out_dir / "samples_check.json", check))
        return written

    return report_or_warn(make, "samples.txt")
