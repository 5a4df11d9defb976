"""What a run writes about its task at test end, chosen by the task's kind.

``write_report(module, datamodule, out_dir)`` looks up :data:`REPORTS` by
``datamodule.spec.kind`` (:data:`reptile_gen.data.task_spec.TASK_KINDS`):

* ``text``: ``samples.txt``, 8 lines drawn from the trained model (seeded by the task's
  ``seed``), and ``samples_untrained.txt`` from the untrained one when the caller has it;
  16 of each and ``samples_check.json`` (the share that parse like the corpus's lines)
  for a corpus with a line check (``task.corpus=listing``);
* ``image``: ``samples.png``, 8 images drawn in the task's pixel order;
* ``sine``: ``learning_curve.png`` and ``fit.png``.

A kind without an entry writes nothing. Samples that cannot be drawn (a module the
sampler cannot replay, e.g. the LSTM baseline) are a warning and no file. Adding a
report = one function ``(module, datamodule, out_dir, untrained) -> [paths]`` and one entry
here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

__all__ = ["REPORTS", "write_report"]


def _text(module, datamodule, out_dir, untrained=None) -> list[Path]:
    from reptile_gen.reports.text import report_text_samples

    corpus = getattr(datamodule, "corpus", None) if datamodule.path is None else None
    return report_text_samples(
        module, out_dir, num_samples=8, seed=datamodule.seed, untrained=untrained, corpus=corpus
    )


def _image(module, datamodule, out_dir, untrained=None) -> list[Path]:
    from reptile_gen.reports.images import report_image_samples

    return report_image_samples(
        module, out_dir, num_samples=8, seed=datamodule.seed, order_for=datamodule.order_for
    )


def _sine(module, datamodule, out_dir, untrained=None) -> list[Path]:
    from reptile_gen.reports.sine import write_sine_report

    return write_sine_report(module, datamodule, out_dir)


#: task kind -> report writer ``(module, datamodule, out_dir, untrained) -> [paths written]``
REPORTS: dict[str, Callable[..., list[Path]]] = {"text": _text, "image": _image, "sine": _sine}


def write_report(module, datamodule, out_dir: str | Path, untrained=None) -> list[Path]:
    """The report of ``datamodule``'s task kind for the tested ``module``, into
    ``out_dir``; ``[]`` for a kind without a report. ``untrained``: the same module before
    training, for reports that show both (text)."""
    spec = getattr(datamodule, "spec", None)
    writer = REPORTS.get(getattr(spec, "kind", "generic"))
    if writer is None:
        return []
    return list(writer(module, datamodule, Path(out_dir), untrained=untrained))
