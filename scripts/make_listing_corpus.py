"""Generate the `listing` text corpus once: an `ls -l`-style line for every file and
directory of a CPython standard library tree (the committed
``reptile_gen/data/corpora/listing.txt.gz`` was made from CPython 3.11.7's
``lib/python3.11`` with this script).

    python scripts/make_listing_corpus.py [STDLIB_DIR] [-o reptile_gen/data/corpora/listing.txt.gz]

One line per entry, sorted by path, ``__pycache__`` and ``site-packages`` left out:
permissions, link count, owner, group, size (right-aligned to the widest), date, path
relative to the tree. The date follows ``ls -l``: month, day and ``HH:MM`` for entries at
most six months older than the newest one in the tree, else month, day and year (relative
to the tree, not to today, so the same tree always gives the same corpus). The gzip header
carries no name or time, so the file depends on the tree only.
"""

from __future__ import annotations

import argparse
import grp
import gzip
import os
import pwd
import stat
import sysconfig
import time
from pathlib import Path

SKIP_DIRS = {"__pycache__", "site-packages"}
SIX_MONTHS = 182.5 * 86400


def _name(lookup, ident: int) -> str:
    try:
        return lookup(ident)[0]
    except KeyError:
        return str(ident)


def entries(root: Path) -> list[tuple[str, os.stat_result]]:
    """``(relative path, lstat)`` of every entry under ``root``, sorted by path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in dirnames + sorted(filenames):
            path = Path(dirpath) / name
            found.append((path.relative_to(root).as_posix(), path.lstat()))
    return sorted(found)


def listing_lines(root: Path) -> list[str]:
    """The corpus lines of the tree at ``root``."""
    found = entries(root)
    newest = max(st.st_mtime for _, st in found)
    width = max(len(str(st.st_size)) for _, st in found)
    lines = []
    for rel, st in found:
        stamp = time.gmtime(st.st_mtime)
        recent = newest - st.st_mtime <= SIX_MONTHS
        date = time.strftime("%b ", stamp) + f"{stamp.tm_mday:2d} "
        date += time.strftime("%H:%M", stamp) if recent else f"{stamp.tm_year:5d}"
        name = rel
        if stat.S_ISLNK(st.st_mode):
            name += " -> " + os.readlink(root / rel)
        lines.append(
            f"{stat.filemode(st.st_mode)} {st.st_nlink} {_name(pwd.getpwuid, st.st_uid)} "
            f"{_name(grp.getgrgid, st.st_gid)} {st.st_size:>{width}} {date} {name}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", default=sysconfig.get_paths()["stdlib"])
    parser.add_argument("-o", "--output", default="reptile_gen/data/corpora/listing.txt.gz")
    args = parser.parse_args()
    lines = listing_lines(Path(args.root))
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    with open(args.output, "wb") as raw, gzip.GzipFile("", "wb", 9, raw, mtime=0) as out:
        out.write(data)
    print(f"{args.output}: {len(lines)} lines, {len(data)} bytes of text from {args.root}")


if __name__ == "__main__":
    main()
