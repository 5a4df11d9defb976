"""Build one workload x engine from the real configs and time its meta-steps.

Runs inside the per-entry subprocess (``python -m benchmarks.run --one ...``), so the peak
RSS it reports belongs to that entry alone.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.workloads import Workload

__all__ = [
    "CONF_DIR",
    "compose",
    "build",
    "optimizer_and_scheduler",
    "meta_step",
    "time_meta_steps",
    "check_gradients",
    "rss_mb",
    "write_report",
]

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


#: where the benchmark scripts write their JSON unless given ``--out``
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def write_report(report: dict, out: Path | None, prefix: str) -> Path:
    """Write ``report`` as strict JSON (a non-finite float in its ``entries`` becomes null)
    to ``out``, or to ``benchmarks/results/<prefix>-<time>.json``; print and return the path."""
    for entry in report.get("entries", []):
        for k, v in entry.items():
            if isinstance(v, float) and not math.isfinite(v):
                entry[k] = None
    out = out or RESULTS_DIR / f"{prefix}-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    print(f"wrote {out}")
    return out


def rss_mb() -> dict[str, float]:
    """Peak RSS of this process so far (``ru_maxrss``) and its current RSS, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_mb = peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
    current_mb = float("nan")
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        current_mb = pages * resource.getpagesize() / (1024 * 1024)
    except OSError:
        pass
    return {"peak": peak_mb, "current": current_mb}


def compose(overrides: list[str]):
    """``conf/config.yaml`` composed with ``overrides``, as the command line would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def build(workload: Workload, engine: str, extra: list[str] = (), device: str = "cpu"):
    """``(module, datamodule, meta_loss)`` of ``engine`` on ``workload``.

    ``meta_loss`` is the module's own for an engine, the hand-written one for a baseline.
    """
    from reptile_gen.utils.instantiate import build_run

    cfg = compose(workload.overrides_for(engine) + list(extra))
    datamodule, module = build_run(cfg)
    module = module.to(device).train()
    if engine in workload.baselines:
        baseline = workload.baselines[engine]

        def meta_loss(batch):
            return baseline(module, batch)

    else:
        meta_loss = module.meta_loss
    return module, datamodule, meta_loss


def optimizer_and_scheduler(module):
    """What ``configure_optimizers`` returns, as (optimizer, scheduler or None)."""
    configured = module.configure_optimizers()
    if isinstance(configured, dict):
        scheduler = configured.get("lr_scheduler")
        if isinstance(scheduler, dict):
            scheduler = scheduler["scheduler"]
        return configured["optimizer"], scheduler
    return configured, None


def meta_step(meta_loss, optimizer, scheduler=None):
    """One outer step as the module's training loop takes it, as a function of a batch:
    ``zero_grad``, ``meta_loss``, ``backward``, the optimizer's step and the scheduler's
    (if any); it returns the meta-loss."""

    def step(batch):
        optimizer.zero_grad(set_to_none=True)
        loss, _ = meta_loss(batch)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        return loss

    return step


def _batches(workload, datamodule, module, count: int, seed: int, device: str, source=None):
    dtype = next(module.parameters()).dtype

    def cast(t):
        return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)

    source = source or workload.batches
    return [b.map(cast) for b in source(datamodule, count, seed)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_meta_steps(
    workload: Workload,
    engine: str,
    *,
    warmup: int,
    min_steps: int,
    max_steps: int,
    min_time_s: float,
    max_time_s: float | None = None,
    num_batches: int = 8,
    device: str = "cpu",
    seed: int = 0,
    quick: bool = False,
) -> dict:
    """Time full meta-steps (``meta_loss`` forward, backward, outer optimizer step, LR
    scheduler step) as the LightningModule's training loop does them.

    After ``warmup`` untimed steps, steps are timed one by one until both ``min_steps``
    and ``min_time_s`` are reached (or ``max_steps``, or ``max_time_s`` seconds of timed
    steps after at least one: the guard of slow workloads). Batches are sampled
    beforehand and cycled, so data generation is not timed. With ``quick``, a workload's
    ``quick_batches`` (e.g. a prefix of each sequence) replace its batches.
    """
    from benchmarks.costs import meta_step_cost

    module, datamodule, meta_loss = build(workload, engine, device=device)
    optimizer, scheduler = optimizer_and_scheduler(module)
    source = workload.quick_batches if quick and workload.quick_batches is not None else None
    batches = _batches(workload, datamodule, module, num_batches, seed, device, source)
    tasks_per_step = batches[0].num_tasks
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    baseline = rss_mb()

    step = meta_step(meta_loss, optimizer, scheduler)
    # the first step pays one-off costs (torch.compile's compilation, allocator warm-up):
    # reported on its own, never in the median
    first_step_s = None
    for i in range(warmup):
        t0 = time.perf_counter()
        step(batches[i % len(batches)])
        _sync(device)
        if i == 0:
            first_step_s = time.perf_counter() - t0

    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_steps:
        elapsed = time.perf_counter() - start
        if len(times) >= min_steps and elapsed >= min_time_s:
            break
        if times and max_time_s is not None and elapsed >= max_time_s:
            break
        batch = batches[(warmup + len(times)) % len(batches)]
        t0 = time.perf_counter()
        loss = step(batch)
        _sync(device)
        times.append(time.perf_counter() - t0)
    final_loss = float(loss.detach())
    after = rss_mb()
    if first_step_s is None:
        first_step_s = times[0]

    arr = np.asarray(times)
    median = float(np.median(arr))
    result = {
        "step_times_s": [round(t, 7) for t in times],
        "median_s_per_step": median,
        "p10_s": float(np.percentile(arr, 10)),
        "p90_s": float(np.percentile(arr, 90)),
        "mean_s": float(arr.mean()),
        "min_s": float(arr.min()),
        "tasks_per_step": tasks_per_step,
        "tasks_per_s": tasks_per_step / median,
        "steps_timed": len(times),
        "warmup_steps": warmup,
        "first_step_s": first_step_s,
        "baseline_rss_mb": baseline["peak"],
        "baseline_current_rss_mb": baseline["current"],
        "peak_rss_mb": after["peak"],
        "rss_delta_mb": after["peak"] - baseline["peak"],
        "num_params": sum(p.numel() for p in module.parameters()),
        "final_loss": final_loss,
        "dtype": str(next(module.parameters()).dtype).replace("torch.", ""),
        "device": device,
        "cost": meta_step_cost(module, batches[0]),
        "support_length": int(batches[0].support_x.shape[1]),
    }
    if (getattr(module, "hparams", {}).get("engine") or {}).get("compile") is True:
        # torch.compile builds its programs in the first step (cold cache: see run.py)
        result["compile_s"] = max(first_step_s - median, 0.0)
    if device.startswith("cuda"):
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / (1024 * 1024)
    return result


def check_gradients(workload: Workload, engines: list[str], device: str = "cpu") -> dict:
    """Meta-gradient of each of ``engines`` against the reference engine's, in float64 on
    one meta-batch, from identical initial parameters.

    Heavy workloads are checked on a tiny variant: ``workload.check_overrides`` are added
    to the composition and the batch comes from ``workload.check_batches``.

    Returns ``{engine: {max_abs_diff, max_rel_diff, ok}}`` where ``max_rel_diff`` is the
    largest difference divided by the largest reference gradient entry.
    """
    precision = ["trainer.precision=64-true", *workload.check_overrides]

    def meta_gradient(engine, state=None):
        module, datamodule, meta_loss = build(workload, engine, precision, device)
        if state is not None:
            module.load_state_dict(state)
        batch = _batches(workload, datamodule, module, 1, 1234, device, workload.check_batches)[0]
        module.zero_grad(set_to_none=True)
        loss, _ = meta_loss(batch)
        loss.backward()
        grads = torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                for p in module.parameters()
            ]
        )
        return module.state_dict(), float(loss.detach()), grads.detach().cpu()

    state, ref_loss, ref = meta_gradient(workload.reference)
    scale = float(ref.abs().max().clamp(min=1e-30))
    out = {}
    for engine in engines:
        if engine == workload.reference:
            continue
        _, loss, g = meta_gradient(engine, state)
        max_abs = float((g - ref).abs().max())
        out[engine] = {
            "against": workload.reference,
            "dtype": "float64",
            "max_abs_diff": max_abs,
            "max_rel_diff": max_abs / scale,
            "loss_diff": abs(loss - ref_loss),
            "ok": bool(torch.allclose(g, ref, rtol=1e-7, atol=1e-9 * scale)),
        }
        if workload.check_note:
            out[engine]["note"] = workload.check_note
    return out
