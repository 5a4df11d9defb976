"""The benchmark's analytic cost model (benchmarks/costs.py) on the real configs, by hand:
sine MAML's FLOPs and a Reptile sequence workload's bytes. Speed itself is never
asserted in tests."""

from __future__ import annotations

import sys

import pytest

from benchmarks.costs import fractions, meta_step_cost
from benchmarks.harness import _batches, build
from benchmarks.workloads import get


def test_sine_maml_flops_by_hand():
    steps = 5
    workload = get(f"sine_maml_{steps}step")
    module, datamodule, _ = build(workload, "functional")
    batch = _batches(workload, datamodule, module, 1, 0, "cpu")[0]
    cost = meta_step_cost(module, batch)
    forward = 2 * (1 * 40 + 40 * 40 + 40 * 1)  # matmul FLOPs per point, MLP 1-40-40-1
    # 25 tasks x (steps x 10 support points x 9F (second order) + 100 query points x 3F)
    assert cost["flops"] == 25 * (steps * 10 * 9 * forward + 100 * 3 * forward)
    params = 40 + 40 + 40 * 40 + 40 + 40 + 1
    assert cost["bytes"] == 25 * steps * params * 4 * 4
    rates = {"matmul_gflops": 50.0, "copy_gbs": 10.0}
    f = fractions(cost, 0.01, rates)
    assert f["flops_fraction"] == pytest.approx(cost["flops"] / 0.01 / 1e9 / 50.0)


def test_reptile_sequence_bytes_by_hand():
    """Reptile (no outer graph) on text, shrunk: one element per step, m = 2."""
    workload = get("text_reptile")
    module, datamodule, _ = build(
        workload,
        "functional",
        extra=["model.body.hidden_sizes=[8]", "model.embedding_dim=4", "task.max_len=64"],
    )
    batch = _batches(workload, datamodule, module, 1, 0, "cpu")[0]
    cost = meta_step_cost(module, batch)
    terms = cost["terms"]
    params = sum(p.numel() for p in module.model.parameters())
    assert (terms["n"], terms["c"], terms["q"], terms["m"]) == (1, 3, 0, 2)
    assert terms["S"] == batch.support_x.shape[1]
    # padding-only task-steps are not counted: T = the real elements (one per step)
    real = int(batch.support_mask.sum())
    assert terms["T"] == real < batch.num_tasks * terms["S"]
    assert cost["bytes"] == real * params * 4 * 2
    assert cost["flops"] == real * 3 * terms["F"]


def test_bench_times_the_compiled_engine_and_reports_its_compile_time(tmp_path):
    """``python -m benchmarks.run`` with the ``functional_compiled`` engine on sine MAML:
    its meta-gradient passes the float64 check against the functional engine, and its
    entry holds the first step's cold torch.compile time apart from the median."""
    import json
    import subprocess

    from conftest import REPO_ROOT

    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--workloads", "sine_maml_1step",
         "--engines", "functional,functional_compiled", "--threads", "1", "--warmup", "1",
         "--min-steps", "2", "--max-steps", "2", "--min-time", "0", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    check = report["grad_checks"]["sine_maml_1step"]["functional_compiled"]
    assert check["ok"] and check["max_rel_diff"] < 1e-12
    entry = next(e for e in report["results"] if e["engine"] == "functional_compiled")
    assert entry["status"] == "ok" and len(entry["compile_s"]) == 1
    assert entry["compile_s"][0] > 0 and entry["first_step_s"][0] > entry["median_s_per_step"]
    assert "torch.compile in the first step" in proc.stdout
