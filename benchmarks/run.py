"""``make bench`` / ``python -m benchmarks.run``: time every workload x engine.

Each workload x engine runs in its own subprocess (``python -m benchmarks.run --one
WORKLOAD ENGINE``), so peak RSS is per entry and an entry that crashes or runs out of
memory fails alone. Before timing, each workload's meta-gradients (every engine and
baseline) are checked against its reference engine in float64, also in a subprocess.
Engines a workload cannot run here (out of memory, no checkpointing) and ``full_only``
workloads outside ``--full`` are recorded as skipped, with the reason.

Writes ``benchmarks/results/bench-<timestamp>.json`` and ``benchmarks/results/latest.json``
(or only ``--out PATH``) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
SCHEMA_VERSION = 1

#: timing budget per entry and repeat (a workload's ``budget`` replaces these for it)
MODES = {
    "quick": {
        "warmup": 3, "min_steps": 10, "max_steps": 500, "min_time_s": 3.0,
        "max_time_s": None, "repeats": 1,
    },
    "full": {
        "warmup": 10, "min_steps": 50, "max_steps": 5000, "min_time_s": 20.0,
        "max_time_s": None, "repeats": 3,
    },
}  # fmt: skip
DEFAULT_TIMEOUT_S = 900.0

#: environment of every timed subprocess (recorded in the JSON). Transparent huge pages
#: for PyTorch's large CPU allocations: the engines allocate fresh per-task weight
#: tensors of tens of MB every inner step, and with 4 KiB pages each one page-faults
#: anew (a 52 MB ``add`` took 145 ms without, 24 ms with it on the 2-core machine).
#: ``--no-thp`` leaves it unset.
CHILD_ENV: dict[str, str] = {"THP_MEM_ALLOC_ENABLE": "1"}


def available_cpus() -> int:
    """CPUs this process may run on (affinity / cgroup-pinned), at most ``os.cpu_count()``."""
    count = os.cpu_count() or 1
    try:
        return max(1, min(count, len(os.sched_getaffinity(0))))
    except (AttributeError, OSError):
        return count


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def auto_threads() -> tuple[int, str]:
    """Torch threads when ``--threads`` is not given: the available CPUs, less those that
    other processes keep busy (1-minute load average), at least 1.

    On a shared machine, intra-op threads that compete with other processes for the cores
    wait on each other at every parallel op: on 2 busy cores, 2 threads made the vmapped
    engine about 80x slower than 1 thread, which would make every ratio meaningless.
    """
    cpus = available_cpus()
    load = load_average()
    if load is None:
        return cpus, f"{cpus} available CPUs (no load average)"
    threads = max(1, min(cpus, round(cpus - load[0])))
    return threads, f"{cpus} available CPUs, 1-minute load average {load[0]:.2f} at start"


def parse_args(argv=None) -> argparse.Namespace:
    from benchmarks.workloads import WORKLOADS

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Median seconds per meta-step and peak memory, per workload x engine.",
    )
    p.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"comma-separated workloads (default: all: {', '.join(WORKLOADS)})",
    )
    p.add_argument(
        "--engines",
        default=None,
        help="comma-separated engines/baselines, e.g. functional,higher,plain_loop "
        "(default: every one each workload has)",
    )
    p.add_argument("--full", action="store_true", help="longer timing, 3 repeats per entry")
    p.add_argument("--repeats", type=int, default=None, help="subprocesses per entry (pooled)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per repeat")
    p.add_argument("--min-steps", type=int, default=None, help="timed steps at least")
    p.add_argument("--max-steps", type=int, default=None, help="timed steps at most")
    p.add_argument("--min-time", type=float, default=None, help="timed seconds at least")
    p.add_argument(
        "--max-time",
        type=float,
        default=None,
        help="stop timing after this many seconds of timed steps (at least one step)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: the available CPUs not kept busy by other processes)",
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help=f"seconds per subprocess (default {DEFAULT_TIMEOUT_S:.0f}, or the workload's own)",
    )
    p.add_argument("--no-check", action="store_true", help="skip the meta-gradient check")
    p.add_argument(
        "--no-thp",
        action="store_true",
        help="do not set THP_MEM_ALLOC_ENABLE=1 (huge pages for large tensors) in the "
        "timed subprocesses",
    )
    p.add_argument("--out", type=Path, default=None, help="write the JSON here only")
    p.add_argument("--list", action="store_true", help="list the workloads and exit")
    # internal: one entry / one gradient check, in a subprocess
    p.add_argument("--one", nargs=2, metavar=("WORKLOAD", "ENGINE"), help=argparse.SUPPRESS)
    p.add_argument("--check", metavar="WORKLOAD", help=argparse.SUPPRESS)
    p.add_argument("--rates", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.threads_reason = "--threads"
    if args.threads is None:
        args.threads, args.threads_reason = auto_threads()
    return args


def settings(args: argparse.Namespace) -> dict:
    mode = "full" if args.full else "quick"
    s = dict(MODES[mode], mode=mode)
    explicit = []
    for key, value in (
        ("repeats", args.repeats),
        ("warmup", args.warmup),
        ("min_steps", args.min_steps),
        ("max_steps", args.max_steps),
        ("min_time_s", args.min_time),
        ("max_time_s", args.max_time),
    ):
        if value is not None:
            s[key] = value
            explicit.append(key)
    # given on the command line: these win over the workloads' own budgets
    s["explicit"] = explicit
    s["threads"] = max(1, min(args.threads, os.cpu_count() or 1))
    s["threads_from"] = args.threads_reason
    s["device"] = args.device
    return s


def budget_for(workload, s: dict) -> dict:
    """The timing settings of ``workload``: the mode's, replaced by the workload's own
    ``budget`` for this mode (and ``min_time_s``), except those given on the command line."""
    from benchmarks.workloads import BUDGET_KEYS

    budget = {key: s[key] for key in BUDGET_KEYS}
    if workload.min_time_s is not None and "min_time_s" not in s["explicit"]:
        budget["min_time_s"] = workload.min_time_s
    for key, value in workload.budget.get(s["mode"], {}).items():
        if key not in s["explicit"]:
            budget[key] = value
    return budget


def timeout_for(workload, args: argparse.Namespace) -> float:
    """Seconds per subprocess: ``--timeout`` if given, else the workload's own (if any)
    or the default."""
    if args.timeout is not None:
        return args.timeout
    return workload.timeout_s or DEFAULT_TIMEOUT_S


# ---------------------------------------------------------------------- child side
def _child_setup(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def child_one(args: argparse.Namespace) -> None:
    """``--one WORKLOAD ENGINE``: time one entry, write its JSON to ``--result``."""
    s = settings(args)
    _child_setup(s["threads"])
    from benchmarks.harness import time_meta_steps
    from benchmarks.workloads import get

    workload = get(args.one[0])
    engine = args.one[1]
    if engine not in workload.all_engines:
        raise SystemExit(f"{workload.name} has no engine {engine!r}: {workload.all_engines}")
    result = time_meta_steps(
        workload,
        engine,
        warmup=s["warmup"],
        min_steps=s["min_steps"],
        max_steps=s["max_steps"],
        min_time_s=s["min_time_s"],
        max_time_s=s["max_time_s"],
        device=s["device"],
        quick=s["mode"] == "quick",
    )
    import torch

    result["threads"] = torch.get_num_threads()
    result["torch"] = torch.__version__
    args.result.write_text(json.dumps(result))


def child_rates(args: argparse.Namespace) -> None:
    """``--rates``: the machine's matmul and copy rates with this run's threads."""
    s = settings(args)
    _child_setup(s["threads"])
    from benchmarks.costs import machine_rates

    args.result.write_text(json.dumps(machine_rates()))


def child_check(args: argparse.Namespace) -> None:
    """``--check W1,W2``: compare meta-gradients, write ``{workload: {engine: ...}}`` to
    ``--result`` (one subprocess for all workloads: the imports are the slow part)."""
    s = settings(args)
    _child_setup(s["threads"])
    from benchmarks.harness import check_gradients
    from benchmarks.workloads import get

    out = {}
    for name in args.check.split(","):
        workload = get(name)
        engines = runnable_engines(workload, args.engines, args.full)
        out[name] = check_gradients(workload, engines, s["device"])
    args.result.write_text(json.dumps(out))


# ---------------------------------------------------------------------- parent side
def selected_engines(workload, engines_arg: str | None) -> list[str]:
    if not engines_arg:
        return list(workload.all_engines)
    wanted = [e.strip() for e in engines_arg.split(",") if e.strip()]
    return [e for e in workload.all_engines if e in wanted]


def runnable_engines(workload, engines_arg: str | None, full: bool) -> list[str]:
    """The selected engines that are not skipped (see :meth:`Workload.skip_reason`)."""
    return [
        e for e in selected_engines(workload, engines_arg) if workload.skip_reason(e, full) is None
    ]


def _passthrough(args: argparse.Namespace, budget: dict | None = None) -> list[str]:
    """The options a subprocess needs to reproduce this run's settings (``budget``: the
    timing settings of one workload, see :func:`budget_for`)."""
    s = settings(args)
    b = budget or s
    cli = [
        "--warmup", str(b["warmup"]),
        "--min-steps", str(b["min_steps"]),
        "--max-steps", str(b["max_steps"]),
        "--min-time", str(b["min_time_s"]),
        "--threads", str(s["threads"]),
        "--device", s["device"],
    ]  # fmt: skip
    if b["max_time_s"] is not None:
        cli += ["--max-time", str(b["max_time_s"])]
    if args.full:
        cli.append("--full")
    return cli


def run_child(cli: list[str], timeout: float) -> tuple[dict | None, dict]:
    """Run ``python -m benchmarks.run <cli> --result tmp``; ``(result or None, info)``."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "benchmarks.run", *cli, "--result", str(result_path)]
        env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline", **CHILD_ENV)
        # a fresh torch.compile cache: compile_s is a cold compile, not a cache load
        env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as e:
            tail = (e.stderr or b"")[-2000:]
            tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
            return None, {"error": f"timed out after {timeout:.0f}s", "stderr_tail": tail}
        info = {"wall_s": round(time.perf_counter() - t0, 2)}
        if proc.returncode != 0 or not result_path.exists():
            rc = proc.returncode
            if rc < 0:
                name = signal.Signals(-rc).name
                why = f"killed by {name}" + (" (out of memory?)" if -rc == signal.SIGKILL else "")
            else:
                why = f"exit status {rc}"
            info.update(error=why, stderr_tail=proc.stderr[-2000:])
            return None, info
        return json.loads(result_path.read_text()), info


def run_repeat(
    workload, engine: str, args: argparse.Namespace, budget: dict
) -> tuple[dict | None, dict]:
    """One subprocess timing ``engine`` on ``workload``."""
    return run_child(
        ["--one", workload.name, engine, *_passthrough(args, budget)], timeout_for(workload, args)
    )


def _entry_base(workload, engine: str) -> dict:
    return {
        "workload": workload.name,
        "engine": engine,
        "kind": "baseline" if engine in workload.baselines else "engine",
        "built_with": workload.overrides_for(engine)[-1],
        "description": workload.description,
        "overrides": workload.overrides_for(engine),
        "batches": getattr(workload.batches, "__name__", str(workload.batches)),
        "bound": workload.bound,
    }


def skipped_entry(workload, engine: str, reason: str) -> dict:
    """The result entry of an engine not run on ``workload``, with the reason."""
    return {**_entry_base(workload, engine), "status": "skipped", "reason": reason}


def aggregate(
    workload,
    engine: str,
    runs: list[dict],
    errors: list[dict],
    wall: float,
    budget: dict | None = None,
    mode: str = "quick",
    rates: dict | None = None,
) -> dict:
    """One result entry from the repeats of ``engine`` on ``workload`` (step times pooled),
    with the achieved FLOP and byte rates and their fractions of ``rates``."""
    entry = _entry_base(workload, engine)
    if mode == "quick" and workload.quick_batches is not None:
        entry["batches"] = getattr(workload.quick_batches, "__name__", "quick_batches")
        entry["quick_note"] = workload.quick_note
    entry["wall_s"] = round(wall, 2)
    if budget is not None:
        entry["budget"] = budget
    if not runs:
        entry.update(status="failed", **errors[0])
        return entry
    import numpy as np

    times = np.asarray([t for r in runs for t in r["step_times_s"]])
    median = float(np.median(times))
    first = runs[0]
    entry.update(
        status="ok" if not errors else "partial",
        median_s_per_step=median,
        p10_s=float(np.percentile(times, 10)),
        p90_s=float(np.percentile(times, 90)),
        mean_s=float(times.mean()),
        min_s=float(times.min()),
        tasks_per_step=first["tasks_per_step"],
        tasks_per_s=first["tasks_per_step"] / median,
        steps_timed=int(times.size),
        warmup_steps=first["warmup_steps"],
        repeats=len(runs),
        repeat_medians_s=[r["median_s_per_step"] for r in runs],
        peak_rss_mb=max(r["peak_rss_mb"] for r in runs),
        baseline_rss_mb=max(r["baseline_rss_mb"] for r in runs),
        rss_delta_mb=max(r["rss_delta_mb"] for r in runs),
        threads=first["threads"],
        torch=first["torch"],
        device=first["device"],
        num_params=first["num_params"],
        dtype=first["dtype"],
        final_loss=first["final_loss"],
        support_length=first.get("support_length"),
        first_step_s=[r.get("first_step_s") for r in runs],
    )
    if "compile_s" in first:  # each repeat is a fresh process: a cold compile each
        entry["compile_s"] = [r["compile_s"] for r in runs]
    if "cost" in first:
        from benchmarks.costs import fractions

        entry["cost"] = first["cost"]
        entry.update(fractions(first["cost"], median, rates))
    if "peak_cuda_mb" in first:
        entry["peak_cuda_mb"] = max(r["peak_cuda_mb"] for r in runs)
    if errors:
        entry["errors"] = errors
    return entry


def ratios(entries: list[dict], workloads: dict) -> tuple[dict, dict]:
    """``{workload: {"<engine>/<reference>": time ratio}}`` and the same for RSS deltas."""
    time_ratios, memory_ratios = {}, {}
    ok = {(e["workload"], e["engine"]): e for e in entries if e["status"] in ("ok", "partial")}
    for name, workload in workloads.items():
        ref = ok.get((name, workload.reference))
        if ref is None:
            continue
        for engine in workload.all_engines:
            e = ok.get((name, engine))
            if e is None or engine == workload.reference:
                continue
            key = f"{engine}/{workload.reference}"
            time_ratios.setdefault(name, {})[key] = (
                e["median_s_per_step"] / ref["median_s_per_step"]
            )
            if ref["rss_delta_mb"] > 0:
                memory_ratios.setdefault(name, {})[key] = e["rss_delta_mb"] / ref["rss_delta_mb"]
    return time_ratios, memory_ratios


def speedup_vs_original(entries: list[dict]) -> dict:
    """``{workload: {engine: original_method time / engine time}}`` for the workloads that
    time the original reptile-gen's method (``original_method``) in the same run."""
    ok = {(e["workload"], e["engine"]): e for e in entries if e["status"] in ("ok", "partial")}
    out = {}
    for (name, engine), e in ok.items():
        original = ok.get((name, "original_method"))
        if original is None or engine == "original_method":
            continue
        out.setdefault(name, {})[engine] = original["median_s_per_step"] / e["median_s_per_step"]
    return out


def comparisons(entries: list[dict], workloads: dict) -> dict:
    """Workload against workload (``compare_with``, e.g. checkpointed vs full unroll), on
    the reference engine: median time, peak RSS and RSS delta of each and their ratios."""
    ok = {(e["workload"], e["engine"]): e for e in entries if e["status"] in ("ok", "partial")}
    out = {}
    for name, workload in workloads.items():
        other = workload.compare_with
        if other is None:
            continue
        engine = workload.reference
        a, b = ok.get((name, engine)), ok.get((other, engine))
        key = f"{name}/{other}"
        if a is None or b is None:
            missing = [n for n, e in ((name, a), (other, b)) if e is None]
            out[key] = {"engine": engine, "missing": [f"{n} / {engine}" for n in missing]}
            continue
        out[key] = {
            "engine": engine,
            "median_s_per_step": {name: a["median_s_per_step"], other: b["median_s_per_step"]},
            "time_ratio": a["median_s_per_step"] / b["median_s_per_step"],
            "peak_rss_mb": {name: a["peak_rss_mb"], other: b["peak_rss_mb"]},
            "peak_rss_ratio": a["peak_rss_mb"] / b["peak_rss_mb"],
            "rss_delta_mb": {name: a["rss_delta_mb"], other: b["rss_delta_mb"]},
            "rss_delta_ratio": (
                a["rss_delta_mb"] / b["rss_delta_mb"] if b["rss_delta_mb"] > 0 else None
            ),
        }
    return out


def format_comparisons(report: dict) -> list[str]:
    lines = []
    for key, c in report.get("comparisons", {}).items():
        if "missing" in c:
            lines.append(f"{key} ({c['engine']}): not compared, missing {', '.join(c['missing'])}")
            continue
        a, b = key.split("/")
        delta = c["rss_delta_ratio"]
        lines.append(
            f"{key} ({c['engine']}): time {c['time_ratio']:.2f}x; "
            f"peak RSS {c['peak_rss_mb'][a]:.0f} / {c['peak_rss_mb'][b]:.0f} MB = "
            f"{c['peak_rss_ratio']:.3f}x; "
            f"dRSS {c['rss_delta_mb'][a]:.0f} / {c['rss_delta_mb'][b]:.0f} MB = "
            + ("n/a" if delta is None else f"{delta:.3f}x")
        )
    return lines


def _cpu_model() -> str | None:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux; ``platform.processor()`` is
    empty there), None where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_info(threads: int, device: str) -> dict:
    import numpy
    import torch

    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or _cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cpu_count": os.cpu_count(),
        "available_cpus": available_cpus(),
        "threads": threads,
        "device": device,
    }
    try:
        from importlib.metadata import version

        info["higher"] = version("higher")
    except Exception:  # not installed, or not as a distribution
        info["higher"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT, capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        info["git_commit"] = commit or None
        info["git_dirty"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def _num(value: float) -> str:
    """Three significant digits, no exponent (0.0112, 95.3, 2222)."""
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def _bound_percent(entry: dict) -> str:
    """The achieved fraction of the machine rate that bounds the workload, in percent
    (``F`` FLOPs, ``B`` bytes)."""
    key = "flops_fraction" if entry.get("bound") == "flops" else "bytes_fraction"
    if key not in entry:
        return ""
    return f"{100 * entry[key]:.3g}% {'F' if key == 'flops_fraction' else 'B'}"


def format_machine_rates(rates: dict | None) -> str:
    if not rates:
        return "machine rates: not measured"
    return (
        f"machine: {rates['matmul_gflops']:.1f} GFLOP/s float32 matmul, "
        f"{rates['copy_gbs']:.1f} GB/s copy, {rates['threads']} thread(s) ({rates['how']})"
    )


def format_table(report: dict) -> str:
    header = (
        "workload", "engine", "median s", "p10-p90 s", "tasks/s",
        "steps", "peak RSS MB", "dRSS MB", "x ref", "GFLOP/s", "GB/s", "% bound",
    )  # fmt: skip
    rows, notes = [header], []
    for e in report["results"]:
        if e["status"] == "failed":
            rows.append((e["workload"], e["engine"], "FAILED", *[""] * 9))
            notes.append(f"{e['workload']} / {e['engine']}: FAILED: {e['error']}")
            continue
        if e["status"] == "skipped":
            rows.append((e["workload"], e["engine"], "skipped", *[""] * 9))
            notes.append(f"{e['workload']} / {e['engine']}: skipped: {e['reason']}")
            continue
        reference = report["references"].get(e["workload"])
        ratio = report["ratios"].get(e["workload"], {}).get(f"{e['engine']}/{reference}")
        if e["engine"] == reference:
            ratio = 1.0
        rows.append(
            (
                e["workload"],
                e["engine"],
                _num(e["median_s_per_step"]),
                f"{_num(e['p10_s'])}-{_num(e['p90_s'])}",
                _num(e["tasks_per_s"]),
                str(e["steps_timed"]),
                f"{e['peak_rss_mb']:.0f}",
                f"{e['rss_delta_mb']:.1f}",
                "" if ratio is None else f"{ratio:.2f}",
                _num(e["achieved_gflops"]) if "achieved_gflops" in e else "",
                _num(e["achieved_gbs"]) if "achieved_gbs" in e else "",
                _bound_percent(e),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))
        ).rstrip()
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    for e in report["results"]:
        if e.get("quick_note"):
            notes.append(f"{e['workload']} / {e['engine']}: {e['quick_note']}")
        if e.get("compile_s"):
            seconds = ", ".join(f"{c:.1f}" for c in e["compile_s"])
            notes.append(
                f"{e['workload']} / {e['engine']}: torch.compile in the first step: {seconds} s "
                "(cold cache; not in the median)"
            )
    return "\n".join(lines + list(dict.fromkeys(notes)))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        child_one(args)
        return 0
    if args.check:
        child_check(args)
        return 0
    if args.rates:
        child_rates(args)
        return 0

    from benchmarks.workloads import WORKLOADS, get

    if args.list:
        for w in WORKLOADS.values():
            engines = ", ".join(e + (" (skipped)" if e in w.skip else "") for e in w.all_engines)
            flags = " [full_only]" if w.full_only else ""
            print(f"{w.name:<26} {engines:<32} {w.description}{flags}")
        return 0

    s = settings(args)
    if args.no_thp:
        CHILD_ENV.pop("THP_MEM_ALLOC_ENABLE", None)
    workloads = {name: get(name) for name in args.workloads.split(",") if name.strip()}
    plan = [(w, e) for w in workloads.values() for e in selected_engines(w, args.engines)]
    if not plan:
        print("nothing to run (check --workloads / --engines)", file=sys.stderr)
        return 2
    skipped = {
        (w.name, e): reason for w, e in plan if (reason := w.skip_reason(e, args.full)) is not None
    }
    to_run = [(w, e) for w, e in plan if (w.name, e) not in skipped]
    budgets = {w.name: budget_for(w, s) for w in workloads.values()}
    started = dt.datetime.now()
    load_start = load_average()
    print(
        f"benchmarks: {len(to_run)} entries ({len(skipped)} more skipped), mode {s['mode']}, "
        f"{s['threads']} threads ({s['threads_from']}), device {s['device']}",
        flush=True,
    )
    for (name, engine), reason in skipped.items():
        print(f"  {name} / {engine}: skipped: {reason}", flush=True)

    rates, info = run_child(["--rates", *_passthrough(args)], 300)
    if rates is None:
        print(f"  machine rates FAILED: {info['error']}", flush=True)
    print("  " + format_machine_rates(rates), flush=True)

    checks, check_failed = {}, False
    to_check = []
    for w in workloads.values():
        engines = runnable_engines(w, args.engines, args.full)
        if not w.check_grads:
            checks[w.name] = {"skipped": w.check_note or "check_grads=False"}
        elif w.reference not in engines or len(engines) < 2:
            checks[w.name] = {"skipped": "fewer than two engines run (nothing to compare)"}
        elif args.no_check:
            checks[w.name] = {"skipped": "--no-check"}
        else:
            to_check.append(w.name)
    if to_check:
        print(f"  checking meta-gradients (float64) of {', '.join(to_check)} ...", flush=True)
        cli = ["--check", ",".join(to_check), *_passthrough(args)]
        if args.engines:
            cli += ["--engines", args.engines]
        result, info = run_child(cli, args.timeout or DEFAULT_TIMEOUT_S)
        if result is None:
            checks.update({name: {"status": "failed", **info} for name in to_check})
            check_failed = True
            print(f"    FAILED: {info['error']}\n{info.get('stderr_tail', '')}", flush=True)
        else:
            checks.update(result)
            for name, per_engine in result.items():
                for engine, c in per_engine.items():
                    check_failed |= not c["ok"]
                    print(
                        f"    {name} {engine:<12} vs {c['against']}: max|diff| "
                        f"{c['max_abs_diff']:.2e} (rel {c['max_rel_diff']:.2e}) "
                        f"{'ok' if c['ok'] else 'MISMATCH'}",
                        flush=True,
                    )

    # repeats interleaved (every entry once, then again...), so a change in machine load
    # shifts all entries rather than one
    collected = {(w.name, e): ([], [], [0.0]) for w, e in to_run}
    most_repeats = max((budgets[w.name]["repeats"] for w, _ in to_run), default=0)
    for r in range(most_repeats):
        for w, engine in to_run:
            repeats = budgets[w.name]["repeats"]
            if r >= repeats:
                continue
            tag = f" (repeat {r + 1}/{repeats})" if repeats > 1 else ""
            print(f"  {w.name} / {engine}{tag} ...", end=" ", flush=True)
            result, info = run_repeat(w, engine, args, budgets[w.name])
            runs, errors, wall = collected[(w.name, engine)]
            wall[0] += info.get("wall_s", 0.0)
            if result is None:
                errors.append(info)
                print(f"FAILED ({info['error']})", flush=True)
            else:
                runs.append(result)
                print(
                    f"{_num(result['median_s_per_step'])} s/step, "
                    f"{result['steps_timed']} steps, peak RSS {result['peak_rss_mb']:.0f} MB, "
                    f"{info['wall_s']:.0f}s",
                    flush=True,
                )
    entries = []
    for w, engine in plan:
        if (w.name, engine) in skipped:
            entries.append(skipped_entry(w, engine, skipped[(w.name, engine)]))
            continue
        runs, errors, wall = collected[(w.name, engine)]
        entries.append(
            aggregate(w, engine, runs, errors, wall[0], budgets[w.name], s["mode"], rates)
        )

    time_ratios, memory_ratios = ratios(entries, workloads)
    vs_original = speedup_vs_original(entries)
    report = {
        "schema_version": SCHEMA_VERSION,
        "created": started.isoformat(timespec="seconds"),
        "duration_s": round((dt.datetime.now() - started).total_seconds(), 1),
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.run", *sys.argv[1:]]),
        "machine": machine_info(s["threads"], s["device"]),
        "machine_rates": rates,
        "child_env": dict(CHILD_ENV),
        # 1/5/15-minute load averages: above available_cpus, other processes competed
        # for the cores and the timings are noisy
        "load_average": {"start": load_start, "end": load_average()},
        "settings": s,
        "definitions": {
            "meta_step": "optimizer.zero_grad; meta_loss(batch) forward; backward; "
            "outer optimizer step (and LR scheduler step), as in the LightningModule",
            "median_s_per_step": "median wall time of one timed meta-step (pooled repeats)",
            "tasks_per_s": "tasks per meta-step / median_s_per_step",
            "peak_rss_mb": "ru_maxrss of the entry's own subprocess at the end (max over repeats)",
            "baseline_rss_mb": "ru_maxrss after imports, model build and batch sampling",
            "rss_delta_mb": "peak_rss_mb - baseline_rss_mb: the memory the meta-steps added",
            "ratios": "median_s_per_step of <engine> / that of the workload's reference engine",
            "speedup_vs_original": "median_s_per_step of original_method (the original "
            "reptile-gen's per-task weight copies, benchmarks/original_method.py) / that of "
            "<engine>, on the same batches in the same run",
            "memory_ratios": "rss_delta_mb of <engine> / that of the reference engine",
            "comparisons": "workload vs workload (compare_with) on the reference engine: "
            "time, peak RSS and RSS delta of each and their ratios",
            "status": "ok | partial (some repeats failed) | failed | skipped (not run: "
            "reason says why)",
            "machine_rates": "float32 2048^2 matmul GFLOP/s and 256 MiB copy GB/s (read + "
            "write bytes), median of 5, with this run's threads (benchmarks/costs.py)",
            "cost": "analytic FLOPs and bytes of one meta-step: flops = T*n*c*F + "
            "B*q*Q*F, bytes = T*P*w*m, T = task-steps holding a real element (terms and "
            "their meaning in benchmarks/costs.py)",
            "achieved_gflops / achieved_gbs": "cost / median_s_per_step",
            "flops_fraction / bytes_fraction": "achieved rate / machine rate; bound says "
            "which one limits the workload (the table's % bound column)",
            "quick_note": "what quick mode ran instead of the full workload (a prefix of "
            "each sequence), if anything",
        },
        "references": {name: w.reference for name, w in workloads.items()},
        "grad_checks": checks,
        "results": entries,
        "ratios": time_ratios,
        "memory_ratios": memory_ratios,
        "speedup_vs_original": vs_original,
        "comparisons": comparisons(entries, workloads),
    }
    text = json.dumps(report, indent=2) + "\n"
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        written = [args.out]
    else:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"bench-{started.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(text)
        (RESULTS_DIR / "latest.json").write_text(text)
        written = [path, RESULTS_DIR / "latest.json"]

    print()
    print(format_machine_rates(rates))
    print(format_table(report))
    for name, r in time_ratios.items():
        pretty = ", ".join(f"{k} = {v:.2f}x" for k, v in r.items())
        print(f"{name}: {pretty}")
    for line in format_comparisons(report):
        print(line)
    for name, r in vs_original.items():
        pretty = ", ".join(f"{k} {v:.1f}x" for k, v in r.items())
        print(f"{name}: x the original's method: {pretty}")
    print(f"total {report['duration_s']:.0f} s")
    print("wrote " + ", ".join(str(p) for p in written))
    busy = max((load_start or [0])[0], (report["load_average"]["end"] or [0])[0])
    if busy > available_cpus():
        print(
            f"warning: load average {busy:.1f} > {available_cpus()} CPUs: other processes "
            "competed for the cores, the timings are noisy (rerun on an idle machine)"
        )
    failed = any(e["status"] == "failed" for e in entries)
    if check_failed:
        print("meta-gradient check FAILED: the timings may not compare like with like")
    return 1 if failed or check_failed else 0


if __name__ == "__main__":
    sys.exit(main())
