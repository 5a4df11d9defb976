"""No import loop between the package's modules or between its folders
(``/work/shared/tools/import_cycles.py``-style check, function-local imports included)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT_CANDIDATES = [
    REPO_ROOT / "tools" / "import_cycles.py",
    REPO_ROOT.parent / "shared" / "tools" / "import_cycles.py",
    Path("/work/shared/tools/import_cycles.py"),
]


def _script() -> Path:
    for path in SCRIPT_CANDIDATES:
        if path.is_file():
            return path
    pytest.skip("import_cycles.py not found (tools/ or ../shared/tools/)")


MODULE_CYCLES_LEFT = pytest.mark.xfail(
    strict=False,
    reason="module cycles utils.ddp<->utils.runtime and inner_loop.batched<->second_order "
    "are removed by other parts of issue 12 (the integrator drops this mark)",
)


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param([], id="modules", marks=MODULE_CYCLES_LEFT),
        pytest.param(["--packages"], id="packages"),
    ],
)
def test_no_import_cycles(mode):
    proc = subprocess.run(
        [sys.executable, str(_script()), "reptile_gen", *mode],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "cycles: 0", proc.stdout
