"""What a meta-step must compute and move, and what this machine can do.

**Machine rates** (:func:`machine_rates`), measured at the start of every run with the
torch threads of the run: a float32 ``2048 x 2048`` matmul (``2 * 2048^3`` FLOPs) and a
copy of a 256 MiB float32 tensor into another (bytes read + bytes written = 512 MiB);
the median of a few repeats after a warm-up each.

**Workload cost** (:func:`meta_step_cost`), an analytic count per meta-step from the
model, the schedule and the batch, with

* ``L`` = sum over the model's ``nn.Linear`` layers of ``in * out`` (embedding lookups
  and elementwise ops are not counted), so ``F = 2 L`` is the matmul FLOPs of the
  forward pass of one element;
* ``P`` = parameters per task, ``w`` = bytes per parameter (4 for float32);
* ``B`` tasks, ``S`` inner steps of ``n`` elements each (few-shot: ``n = K`` support
  points; online: ``n = inner_batch_size``), ``Q`` query points when the meta-objective
  is the query loss;
* ``T`` task-steps that hold at least one real element: ``B * S`` without padding; with
  variable-length sequences padded to the batch's width (text), padding-only steps are
  no work a meta-step must do (they change nothing) and are not counted.

``flops = T * n * c * F + B * q * Q * F`` where an inner step's forward and backward
(weight and input gradients) cost ``3F`` per element, and the outer backward of
second-order MAML differentiates through both (twice their cost again): ``c = 9``
for second order, ``c = 3`` otherwise (first order, Reptile); ``q = 3`` (query forward
and its backward) with a meta-gradient through the query loss, 0 without a query loss.

``bytes = T * P * w * m``: every inner step must at least read and write each
task's own copy of its weights (``m = 2``); the outer backward of second-order MAML
reads and writes them once more (``m = 4``). This is a lower bound for engines that
hold per-task weight copies; an engine that does not (``lowrank``) can exceed the
machine's copy rate by this measure, which is the point of it.

``fraction`` = (count / median seconds) / machine rate, for FLOPs and for bytes; the
workload's ``bound`` says which one limits it (sine: FLOPs; text and MNIST: bytes).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

__all__ = ["machine_rates", "meta_step_cost", "fractions"]


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine_rates(repeats: int = 5, matmul_size: int = 2048, copy_mib: int = 256) -> dict:
    """Float32 matmul GFLOP/s and memory-copy GB/s with the current torch threads."""
    a = torch.randn(matmul_size, matmul_size)
    b = torch.randn(matmul_size, matmul_size)
    out = torch.empty(matmul_size, matmul_size)
    matmul_s = _median_time(lambda: torch.mm(a, b, out=out), repeats)
    n = copy_mib * 1024 * 1024 // 4
    src = torch.ones(n)
    dst = torch.empty(n)
    copy_s = _median_time(lambda: dst.copy_(src), repeats)
    return {
        "matmul_gflops": 2 * matmul_size**3 / matmul_s / 1e9,
        "copy_gbs": 2 * n * 4 / copy_s / 1e9,
        "threads": torch.get_num_threads(),
        "how": f"float32 {matmul_size}x{matmul_size} matmul (2n^3 FLOPs); copy of "
        f"{copy_mib} MiB float32 into another tensor (read + write bytes); median of "
        f"{repeats} after a warm-up",
    }


def meta_step_cost(module, batch) -> dict:
    """The analytic FLOPs and bytes of one meta-step of ``module`` on ``batch`` (see
    the module docstring for the formulas)."""
    model = module.model
    linear = sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear)
    )
    forward = 2 * linear
    params = sum(p.numel() for p in model.parameters())
    width = next(model.parameters()).element_size()
    schedule = module.train_schedule
    slices = schedule.slices(batch.support_x.shape[1])
    steps = len(slices)
    per_step = max((end - start) for start, end in slices) if slices else 0
    tasks = batch.num_tasks
    # task-steps with at least one real (unpadded) element
    mask = batch.support_mask
    task_steps = int(sum(int(mask[:, a:b].any(1).sum()) for a, b in slices)) if slices else 0
    grad_mode = module.grad_mode
    second = grad_mode == "second_order"
    query = batch.query_x.shape[1] if batch.has_query and module.objective == "query" else 0
    query_factor = 3 if grad_mode != "none" and query else 0
    inner_factor = 9 if second else 3
    flops = task_steps * per_step * inner_factor * forward + tasks * query_factor * query * forward
    moved = task_steps * params * width * (4 if second else 2)
    return {
        "flops": float(flops),
        "bytes": float(moved),
        "terms": {
            "B": tasks,
            "S": steps,
            "T": task_steps,
            "n": per_step,
            "Q": query,
            "F": forward,
            "P": params,
            "w": width,
            "c": inner_factor,
            "q": query_factor,
            "m": 4 if second else 2,
        },
        "formulas": "flops = T*n*c*F + B*q*Q*F; bytes = T*P*w*m (benchmarks/costs.py)",
    }


def fractions(cost: dict, median_s: float, rates: dict | None) -> dict:
    """Achieved GFLOP/s and GB/s of a meta-step and their fractions of the machine's."""
    out = {
        "achieved_gflops": cost["flops"] / median_s / 1e9,
        "achieved_gbs": cost["bytes"] / median_s / 1e9,
    }
    if rates:
        out["flops_fraction"] = out["achieved_gflops"] / rates["matmul_gflops"]
        out["bytes_fraction"] = out["achieved_gbs"] / rates["copy_gbs"]
    return out
