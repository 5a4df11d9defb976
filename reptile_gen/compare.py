"""Compare runs in one chart and one table:
``python -m reptile_gen.compare <dir> [<dir>...] [--out chart.png] [--metric auto]``
(console script ``reptile-gen-compare``).

Every ``metrics.json`` below the given dirs (a multirun dir, several run dirs, eval run
dirs) is one run. Runs are labelled by the overrides that differ between them (from each
run's ``.hydra/overrides.yaml``; ``seed`` and bookkeeping keys such as paths and loggers
left out), e.g. ``algorithm=maml``, or, when no override differs, by the algorithm of their
config. Runs with the same label but different seeds form one group: the chart draws each
group's learning curve (test ``<metric>`` after k = 0..N adaptation steps, the
``test/<metric>_step_k`` metrics) as the mean over seeds with a +- one standard deviation
band, together with the random-initialisation baseline (``test/random_init/<metric>_step_k``
averaged over the runs that have it, one baseline per model family: the LSTM baseline's
untrained network is not averaged with the meta-learners'): the "MAML vs first-order MAML
vs Reptile vs transfer vs random init" figure. The table (label, seeds, metric at steps 0, 1 and the last one as
mean +- std) is printed and written as ``comparison.md`` and ``comparison.json`` next to the
chart (default chart: ``<first dir>/comparison.png``).

Sequence tasks (text, digits, MNIST) have no curve but one likelihood per run: with
``--metric auto`` (the default) or e.g. ``--metric nll_bits_per_pixel`` the chart is one bar
per group (mean +- std over seeds) next to the random initialisation, and the table has one
column. Job dirs of a sweep without a ``metrics.json`` (failed or unfinished jobs) are not
counted and are named on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from reptile_gen.utils.json_io import write_json
from reptile_gen.utils.user_errors import UserError

__all__ = [
    "CompareError",
    "Run",
    "Group",
    "find_metrics",
    "load_run",
    "label_runs",
    "group_runs",
    "summarize",
    "format_table",
    "plot_comparison",
    "compare",
    "main",
]

#: override keys that never tell runs apart (bookkeeping), and the seed (grouped over)
SEED_KEYS = ("seed", "task.seed")
IGNORED_KEYS = ("ckpt_path", "run_config", "task_name", "tags", "train", "test", "trainer")
IGNORED_PREFIXES = (
    "hydra",
    "paths",
    "logger",
    "callbacks",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.enable_progress_bar",
)
RANDOM_INIT = "random init"


class CompareError(UserError):
    """Nothing to compare (no runs found, or none with the metric); the message says why."""


@dataclass
class Run:
    """One run dir with a ``metrics.json``."""

    dir: Path
    metrics: dict
    overrides: dict[str, str] = field(default_factory=dict)
    choices: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    label: str = ""

    @property
    def seed(self):
        for key in SEED_KEYS:
            if key in self.overrides:
                return _number(self.overrides[key])
        return self.config.get("seed")

    def series(self, metric: str, kind: str = "curve", prefix: str = "test") -> list[float]:
        """The curve (``kind="curve"``) or ``[prefix/<metric>]`` (``kind="value"``, e.g.
        ``test/nll_bits_per_pixel`` of a sequence task), or ``[]`` when the run lacks it."""
        if kind == "curve":
            return self.curve(metric, prefix)
        value = self.metrics.get(f"{prefix}/{metric}", "missing")
        if value is None:  # a NaN, as write_metrics stores it
            return [math.nan]
        return [float(value)] if isinstance(value, (int, float)) else []

    def curve(self, metric: str, prefix: str = "test") -> list[float]:
        """``[prefix/<metric>_step_0, _step_1, ...]`` up to the first missing step (NaN
        where the value was not finite)."""
        values = []
        while f"{prefix}/{metric}_step_{len(values)}" in self.metrics:
            value = self.metrics[f"{prefix}/{metric}_step_{len(values)}"]
            values.append(math.nan if value is None else float(value))
        return values


@dataclass
class Group:
    """Runs with one label (different seeds): per-step mean and std over them."""

    label: str
    runs: list[Run]
    mean: list[float]
    std: list[float]

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def seeds(self) -> list:
        return [r.seed for r in self.runs]


# ---------------------------------------------------------------------- loading
def _number(text):
    try:
        return int(text)
    except (TypeError, ValueError):
        try:
            return float(text)
        except (TypeError, ValueError):
            return text


def _read_yaml(path: Path):
    if not path.is_file():
        return None
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return None


def _parse_overrides(lines) -> dict[str, str]:
    out = {}
    for line in lines or []:
        line = str(line).strip()
        if not line or line.startswith("~") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        out[key.lstrip("+")] = value
    return out


def find_metrics(dirs) -> list[Path]:
    """Every ``metrics.json`` below ``dirs`` (each dir may itself be a run dir)."""
    found: dict[Path, None] = {}
    for d in dirs:
        d = Path(d)
        if not d.exists():
            raise CompareError(f"{str(d)!r}: no such directory")
        candidates = [d] if d.is_file() else sorted(d.rglob("metrics.json"))
        for path in candidates:
            if path.name == "metrics.json" and path.is_file():
                found.setdefault(path.resolve(), None)
    if not found:
        raise CompareError(
            f"no metrics.json found below {', '.join(repr(str(d)) for d in dirs)} (every "
            "train or eval run writes one into its run dir once it has tested; give a run "
            "dir or a multirun dir)"
        )
    return list(found)


def load_run(metrics_path: str | Path) -> Run:
    """A run from its ``metrics.json`` and the ``.hydra/`` files next to it; an eval run
    (``.hydra/eval_source.yaml``) inherits the overrides and choices of the run that wrote
    its checkpoint, with its own overrides on top."""
    path = Path(metrics_path)
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CompareError(f"{str(path)!r}: not a readable metrics.json ({err})") from err
    hydra_dir = path.parent / ".hydra"
    overrides = _parse_overrides(_read_yaml(hydra_dir / "overrides.yaml"))
    hydra_yaml = _read_yaml(hydra_dir / "hydra.yaml") or {}
    choices = dict(((hydra_yaml.get("hydra") or {}).get("runtime") or {}).get("choices") or {})
    source = _read_yaml(hydra_dir / "eval_source.yaml")
    if isinstance(source, dict):
        overrides = _parse_overrides(source.get("run_overrides")) | _parse_overrides(
            source.get("eval_overrides")
        )
        base = dict(source.get("run_choices") or {})
        choices = base | {k: v for k, v in overrides.items() if k in base}
    config = _read_yaml(hydra_dir / "config.yaml") or {}
    return Run(path.parent, metrics, overrides, choices, config if isinstance(config, dict) else {})


# ---------------------------------------------------------------------- labels and groups
def algorithm_class(target: str):
    """The algorithm class named by an ``_target_`` (None when it cannot be imported)."""
    from hydra.utils import get_class

    try:
        return get_class(str(target))
    except Exception:
        return None


def display_name(cls) -> str:
    """What an algorithm class calls itself in tables: its ``display_name`` attribute
    (the class name when it has none)."""
    return str(getattr(cls, "display_name", cls.__name__))


def algorithm_name(run: Run) -> str:
    """The run's algorithm as its class names itself (:func:`display_name` of the
    config's ``algorithm._target_``); ``first_order: true`` prefixes ``fo`` (first-order
    MAML is MAML with ``first_order``). Without an importable class: the run's
    ``algorithm`` choice."""
    algo = run.config.get("algorithm") or {}
    target = str(algo.get("_target_", ""))
    cls = algorithm_class(target) if target else None
    if cls is None:
        return str(run.choices.get("algorithm") or target.rsplit(".", 1)[-1] or run.dir.name)
    if hasattr(cls, "display_name_for"):
        return str(cls.display_name_for(algo))
    name = display_name(cls)
    if algo.get("first_order"):
        name = ("fo" if name.islower() else "FO") + name
    return name


def _ignored(key: str) -> bool:
    if key in SEED_KEYS or key in IGNORED_KEYS:
        return True
    return any(
        key == p or key.startswith(p + ".") or key.startswith(p + "/") for p in IGNORED_PREFIXES
    )


def _value(run: Run, key: str) -> str:
    if key in run.overrides:
        return str(run.overrides[key])
    if run.choices.get(key) is not None:
        return str(run.choices[key])
    if key == "algorithm":
        return algorithm_name(run)
    node = run.config
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return "default"
    return json.dumps(node) if isinstance(node, (list, dict)) else str(node)


def label_runs(runs: list[Run]) -> list[str]:
    """Label each run by the overrides whose values differ between the runs (seed and
    bookkeeping keys left out); without any, by its algorithm. Sets ``run.label``."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.overrides if not _ignored(k) and k not in keys]
    varying = [k for k in keys if len({_value(r, k) for r in runs}) > 1]
    for run in runs:
        parts = [f"{k}={_value(run, k)}" for k in varying]
        run.label = " ".join(parts) if parts else algorithm_name(run)
    return [r.label for r in runs]


def _mean_std(curves: list[list[float]], truncate: bool = True) -> tuple[list[float], list[float]]:
    """Per-step mean and sample standard deviation (0 for one curve) over ``curves``,
    truncated to the shortest (or, with ``truncate=False``, up to the longest, each step
    over the curves that reach it); NaNs are left out of a step's statistics."""
    length = (min if truncate else max)(len(c) for c in curves)
    means, stds = [], []
    for k in range(length):
        values = [c[k] for c in curves if k < len(c) and not math.isnan(c[k])]
        if not values:
            means.append(math.nan)
            stds.append(math.nan)
            continue
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
        means.append(mean)
        stds.append(math.sqrt(var))
    return means, stds


#: what ``--metric auto`` picks when no run has the ``mse`` curve (sequence tasks)
VALUE_DEFAULTS = ("nll_bits_per_char", "nll_bits_per_pixel")


def available_metrics(runs: list[Run]) -> tuple[list[str], list[str]]:
    """``(curve metrics, value metrics)`` of the runs: ``<m>`` of ``test/<m>_step_k`` and
    of numeric ``test/<m>`` values (confidence intervals and random init left out)."""
    curves, values = set(), set()
    for run in runs:
        for key, value in run.metrics.items():
            if m := re.fullmatch(r"test/([^/]+)_step_0", key):
                curves.add(m.group(1))
            elif (
                (m := re.fullmatch(r"test/([^/]+)", key))
                and not re.search(r"_step_\d+(_ci95)?$|_ci95$", key)
                and (value is None or isinstance(value, (int, float)))
            ):
                values.add(m.group(1))
    return sorted(curves), sorted(values)


def choose_metric(runs: list[Run], metric: str = "auto") -> tuple[str, str]:
    """``(metric, kind)``: ``kind`` is ``curve`` (``test/<metric>_step_k`` over adaptation
    steps) or ``value`` (one number per run, ``test/<metric>``). ``auto`` is the ``mse``
    curve (few-shot tasks) if any run has it, else bits per char or pixel (sequence tasks).
    A metric no run has is a :class:`CompareError` that lists the ones they have."""
    curves, values = available_metrics(runs)
    if metric == "auto":
        for name in ("mse", *curves):
            if name in curves:
                return name, "curve"
        for name in (*VALUE_DEFAULTS, *values):
            if name in values:
                return name, "value"
    elif metric in curves:
        return metric, "curve"
    elif metric in values:
        return metric, "value"
    raise CompareError(
        f"no run has the metric {metric!r} (a curve test/{metric}_step_k or a value "
        f"test/{metric}); metrics found: curves: {', '.join(curves) or 'none'}; values: "
        f"{', '.join(values) or 'none'} (choose one with --metric)"
    )


def model_family(run: Run) -> str:
    """What a run's random initialisation is an initialisation of: the algorithm class's
    ``network_name`` when it has its own network (``lstm`` for the LSTM baseline), else
    the model config's choice (``mlp``, ``text_mlp``, ``lstm_block``...), so untrained
    networks of different architectures are not averaged together."""
    cls = algorithm_class(str((run.config.get("algorithm") or {}).get("_target_", "")))
    if getattr(cls, "network_name", None):
        return str(cls.network_name)
    choice = run.choices.get("model")
    if choice:
        return str(choice)
    model = run.config.get("model") or {}
    body = model.get("body") if isinstance(model, dict) else None
    target = body.get("_target_") if isinstance(body, dict) else None
    return str(target or "model").rsplit(".", 1)[-1]


def group_runs(
    runs: list[Run], metric: str = "mse", kind: str = "curve"
) -> tuple[list[Group], list[Group]]:
    """``(groups, random-init baselines)``: runs labelled (:func:`label_runs`) and grouped
    by label, in order of first appearance; runs without the metric are left out (a
    :class:`CompareError` when none has it). A group's ``mean``/``std`` are per step of the
    curve, or one entry for a ``value`` metric. A baseline averages
    ``test/random_init/<metric>[_step_k]``, step by step, over the runs that have it, one
    baseline per model family (:func:`model_family`; labelled ``random init`` when there
    is one family, ``random init (<family>)`` otherwise); empty if no run has one."""
    with_metric = [r for r in runs if r.series(metric, kind)]
    if not with_metric:
        choose_metric(runs, metric)  # raises, listing what the runs have
        raise CompareError(f"no run has the {kind} metric {metric!r} (choose one with --metric)")
    label_runs(with_metric)
    by_label: dict[str, list[Run]] = {}
    for run in with_metric:
        by_label.setdefault(run.label, []).append(run)
    groups = [
        Group(label, members, *_mean_std([r.series(metric, kind) for r in members]))
        for label, members in by_label.items()
    ]
    by_family: dict[str, list[Run]] = {}
    for run in with_metric:
        if run.series(metric, kind, "test/random_init"):
            by_family.setdefault(model_family(run), []).append(run)
    baselines = [
        Group(
            RANDOM_INIT if len(by_family) == 1 else f"{RANDOM_INIT} ({family})",
            members,
            *_mean_std(
                [r.series(metric, kind, "test/random_init") for r in members], truncate=False
            ),
        )
        for family, members in by_family.items()
    ]
    return groups, baselines


# ---------------------------------------------------------------------- outputs
def _at(group: Group, step: int) -> dict | None:
    if step >= len(group.mean) or math.isnan(group.mean[step]):
        return None
    return {"mean": group.mean[step], "std": group.std[step]}


def _nan_to_none(values):
    return [None if math.isnan(v) else v for v in values]


def summarize(
    groups: list[Group], baselines: list[Group], metric: str, steps, kind: str = "curve"
) -> dict:
    """The comparison as a JSON-able dict (what ``comparison.json`` holds); for a
    ``value`` metric, ``mean``/``std`` have one entry and ``steps`` is ``[0]``.
    ``random_init`` is the list of random-init baselines (one per model family)."""

    def entry(group: Group) -> dict:
        return {
            "label": group.label,
            "n": group.n,
            "seeds": group.seeds,
            "runs": [str(r.dir) for r in group.runs],
            "mean": _nan_to_none(group.mean),
            "std": _nan_to_none(group.std),
            "at_steps": {str(k): _at(group, k) for k in steps},
        }

    return {
        "metric": metric,
        "kind": kind,
        "spread": "sample standard deviation over the runs of a group (seeds)",
        "steps": list(steps),
        "groups": [entry(g) for g in groups],
        "random_init": [entry(b) for b in baselines],
    }


def format_table(
    groups: list[Group], baselines: list[Group], metric: str, steps, kind: str = "curve"
) -> str:
    """A Markdown table: label, seeds, the metric at ``steps`` (mean +- std); a ``value``
    metric has one column, named by the metric."""
    if kind != "curve":
        steps = [0]
    header = ["label", "n seeds"] + (
        [f"{metric.upper()}@{k}" for k in steps] if kind == "curve" else [metric]
    )
    rows = []
    for group in groups + baselines:
        cells = [group.label, str(group.n)]
        for k in steps:
            at = _at(group, k)
            cells.append("—" if at is None else f"{at['mean']:.4g} ± {at['std']:.2g}")
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows]) + "\n"


def plot_comparison(
    groups: list[Group],
    baselines: list[Group],
    path: str | Path,
    metric: str,
    log_y=True,
    kind: str = "curve",
) -> Path:
    """All learning curves in one chart: mean over seeds with a +- std band; the random
    init baselines dashed (one per model family). A ``value`` metric: one bar per group
    with a +- std error bar, the baselines in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if kind != "curve":
        return _plot_values(groups, baselines, Path(path), metric, plt)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = [(g, {"marker": "o", "markersize": 3}) for g in groups]
    greys = ("k", "0.45", "0.7")
    for i, baseline in enumerate(baselines):
        series.append((baseline, {"color": greys[i % len(greys)], "linestyle": "--"}))
    for group, style in series:
        steps = list(range(len(group.mean)))
        label = f"{group.label} (n={group.n})" if group not in baselines else group.label
        (line,) = ax.plot(steps, group.mean, label=label, **style)
        low = [m - s for m, s in zip(group.mean, group.std)]
        if log_y:  # keep the band on a log axis
            low = [max(lo, m * 1e-3) for lo, m in zip(low, group.mean)]
        high = [m + s for m, s in zip(group.mean, group.std)]
        ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("adaptation steps")
    ax.set_ylabel(f"test {metric}")
    if log_y:
        ax.set_yscale("log")
    ax.set_title(f"test {metric} after k adaptation steps (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_values(groups, baselines, path: Path, metric: str, plt) -> Path:
    bars = groups + baselines
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.45 * len(bars)))
    labels = [f"{g.label} (n={g.n})" if g not in baselines else g.label for g in bars]
    ax.barh(
        range(len(bars)),
        [g.mean[0] for g in bars],
        xerr=[g.std[0] for g in bars],
        color=["C0"] * len(groups) + ["0.6"] * (len(bars) - len(groups)),
        capsize=3,
    )
    ax.set_yticks(range(len(bars)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"test {metric}")
    ax.set_title(f"test {metric} (mean ± std over seeds)")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def default_steps(groups: list[Group]) -> list[int]:
    """Table columns: steps 0, 1 and the last step the curves reach."""
    last = max((len(g.mean) for g in groups), default=1) - 1
    return sorted({k for k in (0, 1, last) if k <= last})


def compare(
    dirs, out: str | Path | None = None, metric: str = "auto", steps=None, log_y=True
) -> dict:
    """Find, group, plot and tabulate; returns the summary (``comparison.json``) with the
    paths written under ``"files"``. ``metric="auto"``: see :func:`choose_metric`;
    ``steps=None``: :func:`default_steps`."""
    if not dirs:
        raise CompareError("give at least one run or multirun dir")
    runs = [load_run(p) for p in find_metrics(dirs)]
    metric, kind = choose_metric(runs, metric)
    groups, baselines = group_runs(runs, metric, kind)
    steps = list(steps) if steps is not None else default_steps(groups)
    if kind != "curve":
        steps = [0]
    chart = Path(out) if out else Path(dirs[0]) / "comparison.png"
    plot_comparison(groups, baselines, chart, metric, log_y=log_y, kind=kind)
    summary = summarize(groups, baselines, metric, steps, kind)
    table = format_table(groups, baselines, metric, steps, kind)
    md, js = chart.parent / "comparison.md", chart.parent / "comparison.json"
    title = f"Test {metric} after k adaptation steps" if kind == "curve" else f"Test {metric}"
    md.write_text(f"# {title}\n\n![chart]({chart.name})\n\n{table}")
    missing = _jobs_without_metrics(dirs)
    summary["without_metrics"] = [str(d) for d in missing]
    summary["chart"] = str(chart)
    write_json(js, summary)
    summary["table"] = table
    summary["files"] = [str(chart), str(md), str(js)]
    return summary


def _jobs_without_metrics(dirs) -> list[Path]:
    """Run dirs (with a ``.hydra/`` folder) below ``dirs`` that have no ``metrics.json``:
    failed or unfinished jobs of a sweep, which the comparison does not count."""
    found = []
    for d in dirs:
        for hydra_dir in sorted(Path(d).rglob(".hydra")):
            if hydra_dir.is_dir() and not (hydra_dir.parent / "metrics.json").is_file():
                found.append(hydra_dir.parent)
    return found


def _steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give steps as integers, e.g. 0,1,10") from None
    if not steps or min(steps) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give steps >= 0, e.g. 0,1,10")
    return steps


class _OneLineParser(argparse.ArgumentParser):
    """An argument error is one ``error: ...`` line (and exit status 2), as everywhere in
    the project; ``--help`` has the usage."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def main(argv: list[str] | None = None) -> int:
    parser = _OneLineParser(
        prog="reptile-gen-compare",
        description="Compare the learning curves of runs (multirun or run dirs) in one chart "
        "and one table (seeds grouped: mean ± std).",
    )
    parser.add_argument("dirs", nargs="+", help="run dirs or multirun dirs (searched recursively)")
    parser.add_argument(
        "--out",
        default=None,
        help="chart path (default: <first dir>/comparison.png); "
        "comparison.md and comparison.json are written next to it",
    )
    parser.add_argument(
        "--metric",
        default="auto",
        help="test metric: a curve over adaptation steps (mse: test/mse_step_k) or a value "
        "(e.g. nll_bits_per_pixel); default auto: mse if the runs have it, else bits per "
        "char or pixel",
    )
    parser.add_argument(
        "--steps",
        type=_steps,
        default=None,
        help="table columns of a curve metric (default: 0, 1 and the last step)",
    )
    parser.add_argument("--linear", action="store_true", help="linear y axis (default: log)")
    args = parser.parse_args(argv)
    try:
        summary = compare(args.dirs, args.out, args.metric, args.steps, log_y=not args.linear)
    except CompareError as err:
        parser.exit(2, f"error: {err}\n")
    print(summary["table"], end="")
    for path in summary["without_metrics"]:
        print(f"not counted (no metrics.json: failed or unfinished): {path}", file=sys.stderr)
    for path in summary["files"]:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
