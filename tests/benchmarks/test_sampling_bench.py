"""benchmarks/sampling.py in its quick mode (a tiny digits run): one entry per sampling
path and scoring engine, strict JSON, and both paths draw the same images. Speed itself
is never asserted in tests."""

from __future__ import annotations

import json

import pytest

from benchmarks.sampling import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_mode_writes_strict_json(tmp_path):
    out = tmp_path / "sampling.json"
    main(["--quick", "--num-samples", "4", "--out", str(out)])
    report = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(c))
    entries = report["entries"]
    assert [(e["what"], e.get("path"), e["engine"]) for e in entries] == [
        ("sample", "weights", "lowrank"),
        ("sample", "lowrank", "lowrank"),
        ("score", None, "lowrank"),
        ("score", None, "functional"),
    ]
    assert all(e["seconds"] > 0 and e["extrapolated_s"] >= e["seconds"] for e in entries)
    # the same seed, the same draws on both paths; the same scores on both engines
    assert entries[0]["drawn_on_fraction"] == entries[1]["drawn_on_fraction"]
    assert entries[2]["nll_nats_per_image_prefix"] == pytest.approx(
        entries[3]["nll_nats_per_image_prefix"], rel=1e-4
    )
    assert report["threads"] == 1 and report["load_average_before"] is not None
