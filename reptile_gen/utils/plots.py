"""Plots written into a run dir (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

__all__ = ["plot_learning_curves", "plt"]


def plot_learning_curves(
    curves: dict[str, tuple[list[float], list[float] | None]],
    path: str | Path,
    ylabel: str = "query MSE",
    title: str | None = None,
    log_y: bool = False,
) -> Path:
    """One line per label: ``{label: (mean per step, 95% CI half-width per step or None)}``
    against the number of adaptation steps."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (mean, ci) in curves.items():
        steps = list(range(len(mean)))
        ax.plot(steps, mean, marker="o", markersize=3, label=label)
        if ci is not None:
            m, c = torch.tensor(mean), torch.tensor(ci)
            ax.fill_between(steps, (m - c).tolist(), (m + c).tolist(), alpha=0.2)
    ax.set_xlabel("adaptation steps")
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
