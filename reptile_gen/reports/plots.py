"""Figures written into a run dir (matplotlib, headless): learning curves, image grids
and completion figures."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.image import imsave  # noqa: E402

__all__ = ["plot_learning_curves", "plt", "save_completion_figure", "save_image_grid"]


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


def _tile(images, columns: int, scale: int, pad: int = 1, fill: float = 0.5):
    """Images ``[N, H, W]`` in ``[0, 1]`` as one ``[rows*H', columns*W']`` array."""
    images = torch.as_tensor(images).float().cpu().numpy()
    n, h, w = images.shape
    rows = max(1, math.ceil(n / columns))
    big = np.kron(images, np.ones((1, scale, scale)))
    ch, cw = h * scale + pad, w * scale + pad
    grid = np.full((rows * ch + pad, columns * cw + pad), fill, dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, columns)
        grid[pad + r * ch : pad + r * ch + h * scale, pad + c * cw : pad + c * cw + w * scale] = (
            big[i]
        )
    return grid


def _scale_for(side: int) -> int:
    return max(1, math.ceil(56 / side))


def save_image_grid(images: torch.Tensor, path: str | Path, columns: int | None = None) -> Path:
    """Binary images ``[N, H, W]`` as one PNG grid (white = 1, grey borders)."""
    n = images.shape[0]
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    grid = _tile(images, columns, _scale_for(images.shape[-1]))
    path = Path(path)
    imsave(path, grid, cmap="gray", vmin=0.0, vmax=1.0)
    return path


def save_completion_figure(
    original: torch.Tensor, known: torch.Tensor, completed: torch.Tensor, path: str | Path
) -> Path:
    """Three labelled rows: the originals, the known pixels (unknown ones grey) and the
    completions."""
    original = torch.as_tensor(original).float().cpu()
    known = torch.as_tensor(known).bool().cpu()
    masked = torch.where(known, original, torch.full_like(original, 0.5))
    n, side = original.shape[0], original.shape[-1]
    scale = _scale_for(side)
    rows = [
        ("original", original),
        ("known pixels", masked),
        ("completion", torch.as_tensor(completed).float().cpu()),
    ]
    fig, axes = plt.subplots(3, 1, figsize=(max(3.0, 0.9 * n + 1.2), 3.6))
    for ax, (label, images) in zip(axes, rows):
        ax.imshow(_tile(images, n, scale), cmap="gray", vmin=0.0, vmax=1.0)
        ax.set_ylabel(label, rotation=0, ha="right", va="center")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
