"""reptile_gen.reports: the report is chosen by the task's kind (no DataModule imports
sampling or plots); the task kind on TaskSpec; the text codec shared with the sampler."""

from __future__ import annotations

import pytest
import torch

from reptile_gen.data.task_spec import TASK_KINDS, TaskSpec
from reptile_gen.data.text import END_TOKEN, decode_text, encode_text
from reptile_gen.reports import REPORTS, write_report
from reptile_gen.sampling import SamplingError, encode_prompt


class _Data:
    def __init__(self, kind):
        self.spec = TaskSpec("continuous", "real", kind=kind)


def test_every_task_kind_but_generic_has_a_report():
    assert set(REPORTS) == set(TASK_KINDS) - {"generic"}


def test_a_kind_without_report_writes_nothing(tmp_path):
    assert write_report(object(), _Data("generic"), tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_report_is_looked_up_by_kind(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setitem(
        REPORTS, "text", lambda m, d, out, untrained=None: seen.append(d) or [out / "x"]
    )
    data = _Data("text")
    assert write_report(None, data, tmp_path) == [tmp_path / "x"] and seen == [data]


def test_task_kind_is_checked():
    with pytest.raises(ValueError, match="kind='audio'; allowed: generic, text, image, sine"):
        TaskSpec("continuous", "real", kind="audio")


def test_datamodules_say_their_kind():
    from reptile_gen.data.images import ImageDataModule
    from reptile_gen.data.sine import SineDataModule
    from reptile_gen.data.text import TextDataModule

    assert TextDataModule(max_len=8).spec.kind == "text"
    assert ImageDataModule(dataset="digits", resolution=8).spec.kind == "image"
    assert SineDataModule().spec.kind == "sine"


def test_text_codec_round_trip_and_prompt_limits():
    codes = encode_text("héllo")
    assert decode_text(codes + [END_TOKEN, 65]) == "héllo"
    assert decode_text(torch.tensor(codes)) == "héllo"
    assert encode_prompt("ab", 3) == [97, 98]
    with pytest.raises(SamplingError, match="at most max_len - 1 = 2 bytes"):
        encode_prompt("abc", 3)
    with pytest.raises(SamplingError, match="NUL is the end token"):
        encode_prompt("a\x00", 8)
