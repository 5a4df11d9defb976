"""Time to sample images from a module and to score the test images, per sampling path
and inner-loop engine.

``python -m benchmarks.sampling`` builds an untrained module of ``experiment=mnist_reptile``
(``--model original_mnist``, the original reptile-gen's MNIST model, by default) and times

* **sampling**: ``--num-samples`` (64) images drawn pixel by pixel in the task's order by
  :class:`~reptile_gen.sampling.OnlineSampler` on each ``--paths`` entry, with the module
  built on ``engine=lowrank``;
* **scoring**: the online NLL of the test images, as the algorithm's test step and
  ``python -m reptile_gen.eval`` compute it (:meth:`MetaLearner.evaluate_batch`, which runs
  the module's own engine with ``grad_mode="none"``), for each ``--engines`` entry.

Both run on the first ``--pixels`` pixels of each image (784: whole images); a prefix is
extrapolated to whole images by the ratio of steps (``extrapolated_s``; exact for a cost per
step that does not grow with the step's position, an underestimate otherwise: the JSON says
which prefix was timed). Scoring times ``--score-batches`` test batches (of
``task.eval_batch_size``; all: every test image) and extrapolates to ``--score-images``.

JSON (strict: no NaN) to ``benchmarks/results/sampling-<time>.json`` or ``--out``: the
settings, the machine (threads, load average before and after), and one entry per
measurement, with wall-clock ``seconds`` and this process's CPU time ``cpu_seconds`` (on a
shared machine a niced process waits for a core: its CPU time is the steadier figure);
``peak_rss_mb`` is the process's peak so far (run one entry per process to compare
memory). ``--quick``: a tiny digits run, for the tests.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness import compose, rss_mb, write_report

#: the image workload: the original's MNIST settings
BASE = ("experiment=mnist_reptile", "logger=none")
#: ``--quick``: the 8x8 digits task and a small MLP (seconds), for the benchmark tests
QUICK = ("task=digits", "model=mlp", "model.body.hidden_sizes=[16,16]", "algorithm=reptile")
#: the sampling paths (``OnlineSampler(path=...)``)
PATHS = ("weights", "lowrank")


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def build(overrides: list[str]):
    """``(datamodule, module)`` of the composed config, untrained, in eval mode."""
    from reptile_gen.utils.instantiate import build_run

    cfg = compose(list(overrides))
    datamodule, module = build_run(cfg)
    datamodule.setup("test")
    return datamodule, module.eval()


def make_sampler(module, path: str):
    from reptile_gen.sampling import OnlineSampler

    return OnlineSampler(module, path=path)


def time_sampling(overrides, path: str, num_samples: int, pixels: int, seed: int) -> dict:
    """Seconds to draw ``num_samples`` images on ``path`` over their first ``pixels``."""
    datamodule, module = build(overrides)
    hw = datamodule.num_pixels
    pixels = min(pixels, hw)
    generator = torch.Generator().manual_seed(seed)
    order = datamodule.order_for(num_samples, generator)[:, :pixels]
    coords = datamodule.coords[order]
    sampler = make_sampler(module, path)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        result = sampler.run(coords, generator=generator)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "what": "sample",
        "path": path,
        "engine": module.engine.name,
        "num_samples": num_samples,
        "pixels": pixels,
        "pixels_per_image": hw,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "extrapolated_s": seconds * hw / pixels,
        "extrapolated_cpu_s": cpu * hw / pixels,
        "drawn_on_fraction": float(result.y.float().mean()),
        "peak_rss_mb": rss_mb()["peak"],
    }


def time_scoring(overrides, engine: str, batches: int | None, pixels: int, images: int) -> dict:
    """Seconds to score the test images with the module's own engine (``evaluate_batch``)
    over their first ``pixels``; ``batches`` test batches (None: all)."""
    datamodule, module = build([*overrides, f"engine={engine}"])
    test = list(datamodule.test_dataloader())
    if batches is not None:
        test = test[:batches]
    hw = test[0].support_x.shape[1]
    pixels = min(pixels, hw)
    scored = sum(b.num_tasks for b in test)
    nll = 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    for batch in test:
        part = batch.map(lambda t: t[:, :pixels] if t.dim() > 1 else t)
        nll += float(module.evaluate_batch(part)[:, 0].sum())
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "what": "score",
        "engine": engine,
        "images": scored,
        "pixels": pixels,
        "pixels_per_image": hw,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "extrapolated_s": seconds * (hw / pixels) * (images / scored),
        "extrapolated_cpu_s": cpu * (hw / pixels) * (images / scored),
        "extrapolated_to_images": images,
        "nll_nats_per_image_prefix": nll / scored,
        "peak_rss_mb": rss_mb()["peak"],
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sampling", description=__doc__)
    p.add_argument("--model", default="original_mnist", help="model= of experiment=mnist_reptile")
    p.add_argument("--paths", default=",".join(PATHS), help="sampling paths to time")
    p.add_argument("--engines", default="lowrank,functional", help="engines to score with")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--pixels", type=int, default=784, help="prefix of each image timed")
    p.add_argument("--score-pixels", type=int, default=None, help="default: --pixels")
    p.add_argument("--score-batches", type=int, default=None, help="test batches (all)")
    p.add_argument("--score-images", type=int, default=500, help="extrapolate to this many")
    p.add_argument("--what", default="sample,score", help="sample, score or both")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny digits run (tests)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        overrides = [*QUICK, "logger=none", *args.overrides]
    else:
        overrides = [*BASE, f"model={args.model}", *args.overrides]
    what = args.what.split(",")
    load_before = _load()
    entries = []
    if "sample" in what:
        for path in args.paths.split(","):
            sample_overrides = [*overrides, "engine=lowrank"]
            entry = time_sampling(sample_overrides, path, args.num_samples, args.pixels, args.seed)
            print(json.dumps(entry), flush=True)
            entries.append(entry)
    if "score" in what:
        pixels = args.score_pixels or args.pixels
        for engine in args.engines.split(","):
            entry = time_scoring(overrides, engine, args.score_batches, pixels, args.score_images)
            print(json.dumps(entry), flush=True)
            entries.append(entry)
    report = {
        "command": " ".join(["python -m benchmarks.sampling", *(argv or sys.argv[1:])]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "overrides": overrides,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "load_average_before": load_before,
        "load_average_after": _load(),
        "entries": entries,
    }
    write_report(report, args.out, "sampling")
    return report


if __name__ == "__main__":
    main()
