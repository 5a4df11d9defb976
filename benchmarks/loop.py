"""What the training loop costs per meta-step, against the bare meta-step.

``python -m benchmarks.loop`` runs, per workload,

* **bare**: the meta-step as ``make bench`` times it (``zero_grad``, the module's meta-loss,
  ``backward``, the outer optimizer step), on meta-batches drawn beforehand, in this
  process, with ``--threads`` torch threads: the median of ``--bare-steps`` timed steps
  after warm-up steps (the compiled sine step compiles in its first);
* **fit**: the real command, ``python -m reptile_gen.train <overrides>
  trainer.max_steps=N`` in a subprocess with as many threads, with the configured
  callbacks (progress bar, checkpoints, LR monitor), the divergence guard, the training
  metrics and the data stream, validation off (``trainer.limit_val_batches=0``) and the
  csv logger. A callback added from the command line (``+callbacks.step_timer=...``,
  :class:`StepTimer`) records the time at the start of every training batch, so the
  **loop step** is the median interval between two batch starts: everything one step of
  ``trainer.fit`` costs, without the one-off costs. ``fit_seconds`` (``metrics.json``, the
  wall-clock of ``trainer.fit``) divided by the steps is reported too, with the first
  step (the compilation, when there is one) apart.

JSON (strict) to ``benchmarks/results/loop-<time>.json`` or ``--out``: per workload the
overrides, steps, the bare and loop medians (ms) and their ratio (``loop_over_bare``),
``fit_seconds`` and ``fit_over_bare`` (``fit_seconds / steps`` over the bare median),
and the machine. ``--quick``: few steps of the sine workload (the tests).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from benchmarks.harness import compose, meta_step, optimizer_and_scheduler, write_report

ROOT = Path(__file__).resolve().parents[1]

#: name -> (overrides, steps of the fit run): the issue's three tasks, each as a user runs it
WORKLOADS: dict[str, tuple[tuple[str, ...], int]] = {
    "sine_maml_compiled": (("experiment=sine_maml", "engine.compile=true"), 20000),
    "sine_maml": (("experiment=sine_maml",), 10000),
    "digits_maml": (("experiment=digits_maml",), 300),
    "text_listing": (("experiment=listing", "baseline=null", "trainer.max_time=null"), 30),
}
QUICK_STEPS = 60


class StepTimer(pl.Callback):
    """Writes ``{"starts": [...]}`` (``time.perf_counter`` at the start of every training
    batch, and once more at the end of training) to ``out`` when training ends."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        self.starts.append(time.perf_counter())
        Path(self.out).write_text(json.dumps({"starts": self.starts}))


def bare_step_times(overrides: list[str], steps: int, warmup: int) -> list[float]:
    """Seconds of ``steps`` bare meta-steps after ``warmup`` untimed ones (batches of the
    run's own training stream, drawn beforehand)."""
    from reptile_gen.data.streams import step_generator
    from reptile_gen.utils.instantiate import build_run

    cfg = compose([*overrides, "logger=none"])
    datamodule, module = build_run(cfg)
    module.train()
    if hasattr(datamodule, "setup"):
        datamodule.setup("fit")
    dtype = next(module.parameters()).dtype
    batches = [
        datamodule.sample(step_generator(datamodule.seed, i)).map(
            lambda t: t.to(dtype) if t.is_floating_point() else t
        )
        for i in range(8)
    ]
    step = meta_step(module.meta_loss, *optimizer_and_scheduler(module))

    for i in range(warmup):
        step(batches[i % len(batches)])
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(batches[i % len(batches)])
        times.append(time.perf_counter() - t0)
    return times


def fit_run(overrides: list[str], steps: int, threads: int, workdir: Path) -> dict:
    """The real training command for ``steps`` meta-steps; its step starts and metrics."""
    starts_path = workdir / "starts.json"
    command = [
        sys.executable,
        "-m",
        "reptile_gen.train",
        *overrides,
        f"trainer.max_steps={steps}",
        "trainer.limit_val_batches=0",
        "logger=csv",
        f"hydra.run.dir={workdir / 'run'}",
        "+callbacks.step_timer._target_=benchmarks.loop.StepTimer",
        f"+callbacks.step_timer.out={starts_path}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    metrics = json.loads((workdir / "run" / "metrics.json").read_text())
    starts = json.loads(starts_path.read_text())["starts"]
    return {"command": command[1:], "metrics": metrics, "starts": starts}


def measure(name: str, overrides: tuple[str, ...], steps: int, threads: int, quick: bool) -> dict:
    bare_steps = min(steps, 2000) if not quick else 20
    warmup = 3 if quick else max(10, min(200, steps // 20))
    bare = np.asarray(bare_step_times(list(overrides), bare_steps, warmup))
    with tempfile.TemporaryDirectory(prefix="loop-") as tmp:
        fit = fit_run(list(overrides), steps, threads, Path(tmp))
    intervals = np.diff(np.asarray(fit["starts"]))
    steady = intervals[min(warmup, len(intervals) - 1) :]
    fit_seconds = float(fit["metrics"]["fit_seconds"])
    first = float(intervals[0])
    bare_median = float(np.median(bare))
    loop_median = float(np.median(steady))
    return {
        "workload": name,
        "overrides": list(overrides),
        "steps": steps,
        "bare_steps_timed": int(bare.size),
        "bare_median_ms": 1e3 * bare_median,
        "bare_mean_ms": 1e3 * float(bare.mean()),
        "batches_timed": int(intervals.size),
        "loop_median_ms": 1e3 * loop_median,
        "loop_mean_ms": 1e3 * float(steady.mean()),
        "loop_over_bare": loop_median / bare_median,
        "first_step_s": first,
        "fit_seconds": fit_seconds,
        "fit_per_step_ms": 1e3 * fit_seconds / steps,
        "fit_over_bare": fit_seconds / steps / bare_median,
        "fit_after_first_step_over_bare": (fit_seconds - first) / max(steps - 1, 1) / bare_median,
        "fit_command": "python " + " ".join(fit["command"]),
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loop", description=__doc__)
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated")
    p.add_argument("--steps", type=int, default=None, help="meta-steps of each fit run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps (the tests)")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [n for n in args.workloads.split(",") if n]
    unknown = sorted(set(names) - set(WORKLOADS))
    if unknown:
        print(f"error: --workloads={','.join(unknown)}: unknown; allowed: {', '.join(WORKLOADS)}")
        raise SystemExit(2)
    load_before = [round(x, 2) for x in os.getloadavg()]
    entries = []
    for name in names:
        overrides, steps = WORKLOADS[name]
        steps = QUICK_STEPS if args.quick else (args.steps or steps)
        entry = measure(name, overrides, steps, args.threads, args.quick)
        print(
            f"{name}: bare {entry['bare_median_ms']:.3f} ms, loop {entry['loop_median_ms']:.3f} ms "
            f"({entry['loop_over_bare']:.2f}x), fit_seconds/steps {entry['fit_per_step_ms']:.3f} ms "
            f"({entry['fit_over_bare']:.2f}x; first step {entry['first_step_s']:.2f} s)",
            flush=True,
        )
        entries.append(entry)
    report = {
        "command": " ".join(["python -m benchmarks.loop", *(argv or sys.argv[1:])]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "threads": args.threads,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "entries": entries,
    }
    write_report(report, args.out, "loop")
    return report


if __name__ == "__main__":
    main()
