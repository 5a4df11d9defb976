"""The `listing` corpus (task.corpus=listing): shipped with the package, the same on every
machine, every line an `ls -l` line; the line check that the main job's samples are
scored by."""

from __future__ import annotations

import gzip

import pytest

from reptile_gen.data.corpora import HERE, corpus_texts, is_listing_line, share_passing
from reptile_gen.data.text import TextDataModule

#: sha256 of the corpus's lines as the text task joins them (metrics.json's
#: data/corpus_sha256): a regenerated or edited corpus changes every result
LISTING_SHA256 = "c3ebc17512f2fb66370e6797acefd690994f5047624509693f907f98e9049a40"


def test_listing_corpus_loads_offline_from_the_package():
    assert (HERE / "listing.txt.gz").is_file()
    data = TextDataModule(corpus="listing", max_len=128)
    data.setup()
    assert data.source == "listing.txt.gz"
    assert data.corpus_sha256 == LISTING_SHA256
    sizes = {split: len(lines) for split, lines in data.lines.items()}
    assert sizes == {"train": 2349, "val": 138, "test": 136}
    assert all(is_listing_line(line) for lines in data.lines.values() for line in lines)


def test_the_packaged_file_is_plain_gzip_text():
    raw = gzip.decompress((HERE / "listing.txt.gz").read_bytes()).decode("utf-8")
    assert raw.endswith("\n") and raw.count("\n") == 2623
    texts, source = corpus_texts("listing")
    assert texts == [raw] and source == "listing.txt.gz"


GOOD = [
    "-rw-r--r-- 1 root root    74810 May  9 07:35 asyncio/base_events.py",
    "drwxr-xr-x 2 root root     4096 Dec 31  2019 asyncio",
    "lrwxrwxrwx 1 root root        7 Jan  1 00:00 lib -> usr/lib",
    "-rwsr-xr-t 12 alice staff 0 Feb 29 23:59 a b c.txt",
]
BAD = [
    "",
    "-rw-r--r-- 1 root root    74810 May  9 07:35",  # no name
    "-rw-r--r-- 1 root root    74810 Mai  9 07:35 x.py",  # no such month
    "-rw-r--r-- 1 root root    74810 May 32 07:35 x.py",  # no such day
    "-rw-r--r-- 1 root root    74810 May  9 24:35 x.py",  # no such hour
    "-rw-r--r-- 1 root root   7481O May  9 07:35 x.py",  # size not a number
    "-rw-r-xr-- 0 root root    74810 May  9 07:35 x.py",  # no links
    "-rwxr--r--x 1 root root   74810 May  9 07:35 x.py",  # ten permission letters
    "rw-r--r-- 1 root root    74810 May  9 07:35 x.py",  # no type letter
    "-rw-r--r-- 1 root root    74810 May  9 07:35 x\x01.py",  # control character
    "The quick brown fox jumps over the lazy dog",
]


@pytest.mark.parametrize("line", GOOD)
def test_ls_lines_parse(line):
    assert is_listing_line(line)


@pytest.mark.parametrize("line", BAD)
def test_other_lines_do_not_parse(line):
    assert not is_listing_line(line)


def test_share_passing():
    assert share_passing(GOOD[:2] + BAD[:2], "listing") == 0.5
    assert share_passing(GOOD, "pydoc") is None  # pydoc has no line check
    assert share_passing([], "listing") is None


def test_pydoc_stays_the_default_corpus():
    data = TextDataModule(max_len=32)
    data.setup()
    assert data.corpus == "pydoc" and data.source == "pydoc_data.topics"


def test_corpus_errors(tmp_path):
    with pytest.raises(ValueError, match="task.corpus='prose': no such corpus; allowed: pydoc"):
        TextDataModule(corpus="prose")
    with pytest.raises(ValueError, match="give one of them"):
        TextDataModule(path=str(tmp_path / "a.txt"), corpus="listing")
