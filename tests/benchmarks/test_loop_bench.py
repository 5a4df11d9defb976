"""benchmarks/loop.py in its quick mode: the real training command with the step timer
added from the command line, its steps all timed, strict JSON. Speed itself is never
asserted in tests."""

from __future__ import annotations

import json

import pytest

from benchmarks.loop import QUICK_STEPS, main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_mode_times_the_real_loop_and_writes_strict_json(tmp_path):
    out = tmp_path / "loop.json"
    main(["--quick", "--workloads", "sine_maml", "--out", str(out)])
    report = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(c))
    (entry,) = report["entries"]
    assert entry["workload"] == "sine_maml" and entry["steps"] == QUICK_STEPS
    assert entry["bare_steps_timed"] == 20
    assert entry["bare_median_ms"] > 0 and entry["loop_median_ms"] > 0
    # the fit ran the real command, every step went through the timer
    assert "reptile_gen.train" in entry["fit_command"]
    assert "+callbacks.step_timer._target_=benchmarks.loop.StepTimer" in entry["fit_command"]
    assert entry["batches_timed"] == QUICK_STEPS and entry["fit_seconds"] > 0
    assert entry["fit_over_bare"] == pytest.approx(
        entry["fit_seconds"] / QUICK_STEPS / (entry["bare_median_ms"] / 1e3)
    )
    assert report["threads"] == 1


def test_unknown_workload_is_one_error_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--workloads", "nope"])
    assert exit_info.value.code == 2
    line = capsys.readouterr().out.strip()
    assert line.startswith("error: --workloads=nope: unknown; allowed: sine_maml_compiled")
