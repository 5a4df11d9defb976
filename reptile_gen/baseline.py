"""A run's baseline trained for the same wall-clock, and the comparison printed at its end.

An experiment with a ``baseline`` node (the main job, ``experiment=listing``) trains, after
its own fit and test, a second experiment (``baseline.experiment``, e.g. the LSTM
baseline ``listing_lstm``) on the same task (the main run's ``task`` node) with ``trainer.max_time`` set to the main
model's fitting time, into ``<run dir>/baseline/``. Then it prints one block: the test
metric of the main model next to the reference of its task (unigram or random init) and
next to the baseline's, the steps each reached, and the samples of the untrained and the
trained model side by side. ``metrics.json`` gets the baseline's numbers under
``baseline/``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from reptile_gen.cli import compose_run_config, print_samples
from reptile_gen.utils.json_io import write_json

__all__ = ["run_baseline", "print_comparison", "max_time_of"]

log = logging.getLogger(__name__)

#: headline metric of a task kind, and its reference (the untrained or unigram model)
HEADLINES = (
    ("test/nll_bits_per_char", "test/unigram/nll_bits_per_char", "bits/char"),
    ("test/nll_bits_per_pixel", "test/random_init/nll_bits_per_pixel", "bits/pixel"),
)


def max_time_of(seconds: float) -> str:
    """``seconds`` (rounded up to whole seconds) as Lightning's ``DD:HH:MM:SS``."""
    total = max(1, int(-(-float(seconds) // 1)))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{days:02d}:{hours:02d}:{minutes:02d}:{secs:02d}"


def steps_of(metrics: dict) -> int | None:
    """The meta-steps (or steps) a run reached, from its ``metrics.json`` segments."""
    segments = metrics.get("segments") or []
    return int(segments[-1]["to_step"]) if segments else None


def run_baseline(cfg: DictConfig, metrics: dict, train_fn) -> dict:
    """Train and test ``cfg.baseline.experiment`` for the main run's fitting time
    (``metrics['fit_seconds']``) with ``train_fn`` (``reptile_gen.train.train``), into
    ``<run dir>/baseline``; returns its metrics."""
    spec = cfg.baseline
    budget = max_time_of(metrics.get("fit_seconds") or 60.0)
    overrides = [
        f"experiment={spec.experiment}",
        f"seed={cfg.seed}",
        f"trainer.max_time={budget}",
        *[str(o) for o in (spec.get("overrides") or [])],
    ]
    log.info("baseline for the same wall-clock (%s): %s", budget, " ".join(overrides))
    baseline_cfg = compose_run_config(overrides)
    with open_dict(baseline_cfg):
        # the very same lines, split and test lines as the main run
        own_input = baseline_cfg.task.get("prev_input", False)
        baseline_cfg.task = OmegaConf.create(OmegaConf.to_container(cfg.task, resolve=True))
        if "prev_input" in baseline_cfg.task:
            # what the model reads is the baseline's own choice (the LSTM always feeds
            # the previous element back and refuses the option), not the lines
            baseline_cfg.task.prev_input = own_input
        baseline_cfg.paths.output_dir = str(Path(cfg.paths.output_dir) / "baseline")
        baseline_cfg.baseline = None
    return train_fn(baseline_cfg)


def record_baseline(out_dir: Path, baseline: dict, experiment: str) -> dict:
    """Add the baseline's headline numbers to ``out_dir/metrics.json``; returns them."""
    added = {"baseline/experiment": experiment, "baseline/fit_seconds": baseline.get("fit_seconds")}
    added["baseline/steps"] = steps_of(baseline)
    for metric, _, _ in HEADLINES:
        if metric in baseline:
            added[f"baseline/{metric}"] = baseline[metric]
    path = Path(out_dir) / "metrics.json"
    if path.is_file():
        write_json(path, dict(sorted({**json.loads(path.read_text()), **added}.items())))
    return added


def print_comparison(cfg: DictConfig, metrics: dict, baseline: dict, out_dir: Path) -> None:
    """The end-of-run block: main model vs reference vs baseline, then the samples."""
    name = f"{cfg.algorithm._target_.rsplit('.', 1)[-1]} ({cfg.get('task_name')})"
    other = str(cfg.baseline.experiment)
    print()
    print(f"== {name} after {metrics.get('fit_seconds', 0):.0f} s of fitting ==")
    for metric, reference, unit in HEADLINES:
        if metric not in metrics:
            continue
        rows = [(name, metrics.get(metric), metrics.get("fit_seconds"), steps_of(metrics))]
        rows.append((f"baseline {other}", baseline.get(metric), baseline.get("fit_seconds")))
        rows[-1] += (steps_of(baseline),)
        label = "unigram" if "unigram" in reference else "untrained"
        rows.append((f"{label} reference", metrics.get(reference), None, None))
        print(f"test {unit} (lower is better):")
        for who, value, seconds, steps in rows:
            shown = "-" if value is None else f"{value:.3f}"
            how = "" if seconds is None else f"  ({seconds:.0f} s, {steps} steps)"
            print(f"  {who:<40} {shown:>7}{how}")
    print_samples(Path(out_dir))
    print(f"run dir: {out_dir}")
