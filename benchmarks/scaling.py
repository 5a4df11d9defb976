"""How a sequence workload's meta-step grows with the sequence length.

``python -m benchmarks.scaling --workloads mnist_reptile_orig --lengths 64,128,256,512``
times one meta-step (after one untimed step) on the first T elements of each sequence for
every T and engine, fits ``t(T) = a + b T + c T^2`` by least squares, and reports the
share of the quadratic term at the longest T and the fit's extrapolation to the whole
sequence: a step whose cost does not depend on its position has ``c ~ 0``. With
``--profile`` the longest T of each engine also runs once under ``torch.profiler``: the
ops with the most self CPU time. JSON to ``benchmarks/results/scaling-<time>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import _batches, build, meta_step, optimizer_and_scheduler, write_report
from benchmarks.workloads import WORKLOADS, prefix_batches


def time_length(workload, engine: str, length: int, repeats: int) -> dict:
    module, datamodule, meta_loss = build(workload, engine)
    optimizer, _ = optimizer_and_scheduler(module)
    source = prefix_batches(length)
    if workload.batches.__name__.startswith("all_positions_real"):
        from benchmarks.original_method import all_positions_real

        source = all_positions_real(source)
    batches = _batches(workload, datamodule, module, repeats + 1, 0, "cpu", source)

    step = meta_step(meta_loss, optimizer)
    step(batches[0])
    times = []
    for batch in batches[1:]:
        t0 = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - t0)
    return {"length": length, "median_s": float(np.median(times)), "times_s": times}


def profile_length(workload, engine: str, length: int, top: int = 15) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    module, datamodule, meta_loss = build(workload, engine)
    batch = _batches(workload, datamodule, module, 1, 0, "cpu", prefix_batches(length))[0]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss, _ = meta_loss(batch)
        loss.backward()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [
        {
            "op": e.key,
            "self_cpu_s": e.self_cpu_time_total / 1e6,
            "share": e.self_cpu_time_total / total,
            "calls": e.count,
        }
        for e in events[:top]
    ]


def fit(points: list[dict], full_length: int | None) -> dict:
    t = np.array([p["length"] for p in points], dtype=float)
    y = np.array([p["median_s"] for p in points])
    design = np.stack([np.ones_like(t), t, t * t], 1)
    (a, b, c), *_ = np.linalg.lstsq(design, y, rcond=None)
    longest = t.max()
    out = {
        "a_s": float(a),
        "b_s_per_step": float(b),
        "c_s_per_step2": float(c),
        "quadratic_share_at_longest": float(
            c * longest**2 / max(a + b * longest + c * longest**2, 1e-12)
        ),
    }
    if full_length:
        out["extrapolated_s_at_full_length"] = float(a + b * full_length + c * full_length**2)
        out["full_length"] = full_length
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", required=True, help="comma-separated workloads")
    parser.add_argument("--engines", default=None, help="default: every one each workload has")
    parser.add_argument("--lengths", default="32,64,128,256", help="prefix lengths T")
    parser.add_argument("--full-length", type=int, default=None, help="extrapolate to this T")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per length")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--profile", action="store_true", help="profile the longest T")
    parser.add_argument("--out", default=None, help="JSON path")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    report = {"created": dt.datetime.now().isoformat(timespec="seconds"), "threads":
              torch.get_num_threads(), "command": " ".join(["-m benchmarks.scaling", *sys.argv[1:]]),
              "results": []}  # fmt: skip
    for name in args.workloads.split(","):
        workload = WORKLOADS[name]
        engines = args.engines.split(",") if args.engines else list(workload.all_engines)
        for engine in engines:
            if workload.skip_reason(engine, full=True):
                continue
            points = []
            for length in lengths:
                point = time_length(workload, engine, length, args.repeats)
                print(f"{name} / {engine} T={length}: {point['median_s']:.3f} s", flush=True)
                points.append(point)
            entry = {"workload": name, "engine": engine, "points": points}
            if len(points) >= 3:
                entry["fit"] = fit(points, args.full_length)
                f = entry["fit"]
                print(
                    f"{name} / {engine}: t(T) = {f['a_s']:.3g} + {f['b_s_per_step']:.3g} T + "
                    f"{f['c_s_per_step2']:.3g} T^2; quadratic share at T={max(lengths)}: "
                    f"{f['quadratic_share_at_longest']:.0%}"
                    + (
                        f"; at T={args.full_length}: {f['extrapolated_s_at_full_length']:.1f} s"
                        if args.full_length
                        else ""
                    ),
                    flush=True,
                )
            if args.profile:
                entry["profile"] = profile_length(workload, engine, max(lengths))
                for row in entry["profile"][:8]:
                    print(f"    {row['share']:6.1%}  {row['op']}  ({row['calls']} calls)")
            report["results"].append(entry)
    write_report(report, Path(args.out) if args.out else None, "scaling")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
