"""The text task's named offline corpora (``task.corpus=<name>``) and their line checks.

* ``pydoc``: CPython's ``pydoc_data.topics`` (the help texts that ship with every Python),
  ~8.7k non-empty lines of English prose and grammar;
* ``listing``: ``listing.txt.gz`` here, an ``ls -l``-style line (permissions, links,
  owner, group, size, date, path) for each of the 2,623 files and directories of CPython
  3.11.7's standard library, made once by ``scripts/make_listing_corpus.py`` and shipped
  as package data, so it is the same on every machine. Its columns sit at fixed
  positions, a structure that a model whose input is the character position can learn
  in minutes.

A corpus with a line check (:data:`LINE_CHECKS`) lets a run say which share of its
sampled lines look like the corpus's lines (:func:`share_passing`).
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "CORPORA",
    "LINE_CHECKS",
    "LISTING_LINE",
    "corpus_texts",
    "is_listing_line",
    "share_passing",
]

HERE = Path(__file__).resolve().parent


def _pydoc() -> tuple[list[str], str]:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return [topics[k] for k in sorted(topics)], "pydoc_data.topics"


def _listing() -> tuple[list[str], str]:
    path = HERE / "listing.txt.gz"
    return [gzip.decompress(path.read_bytes()).decode("utf-8")], "listing.txt.gz"


#: corpus name -> loader ``() -> (texts, source label)``; lines are split by the caller
CORPORA: dict[str, Callable[[], tuple[list[str], str]]] = {
    "pydoc": _pydoc,
    "listing": _listing,
}

_MONTH = "(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_DAY = "(?: [1-9]|[12][0-9]|3[01])"
_TIME_OR_YEAR = r"(?:(?:[01][0-9]|2[0-3]):[0-5][0-9]| [12][0-9]{3})"
#: one line of ``ls -l``: type and permissions, links, owner, group, size, date, a name
#: (``name -> target`` for a link) without control characters
LISTING_LINE = re.compile(
    r"[-dlcbps][-r][-w][-xsS][-r][-w][-xsS][-r][-w][-xtT] [1-9][0-9]* [^\s]+ [^\s]+ +"
    rf"(?:0|[1-9][0-9]*) {_MONTH} {_DAY} {_TIME_OR_YEAR} [^\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*"
)


def is_listing_line(line: str) -> bool:
    """Whether ``line`` parses as a line of the ``listing`` corpus (an ``ls -l`` line)."""
    return LISTING_LINE.fullmatch(line) is not None


#: corpus name -> its line check ``line -> bool`` (a corpus without one is not checked)
LINE_CHECKS: dict[str, Callable[[str], bool]] = {"listing": is_listing_line}


def corpus_texts(name: str) -> tuple[list[str], str]:
    """The texts of the named corpus and its source label; a clear error for a name that
    is not one."""
    if name not in CORPORA:
        raise ValueError(
            f"task.corpus={name!r}: no such corpus; allowed: {' | '.join(CORPORA)} "
            "(or a file with task.path=<UTF-8 file>)"
        )
    return CORPORA[name]()


def share_passing(lines: list[str], corpus: str) -> float | None:
    """The share of ``lines`` that pass ``corpus``'s line check (None: it has none)."""
    check = LINE_CHECKS.get(corpus)
    if check is None or not lines:
        return None
    return sum(map(check, lines)) / len(lines)
