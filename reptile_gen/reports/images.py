"""The image tasks' report: ``samples.png``, a few images drawn from the trained model."""

from __future__ import annotations

from pathlib import Path

import torch

from reptile_gen.reports.common import report_or_warn
from reptile_gen.reports.plots import save_image_grid
from reptile_gen.sampling import generate_images

__all__ = ["report_image_samples"]


def report_image_samples(
    module,
    out_dir: str | Path,
    num_samples: int = 8,
    seed: int = 0,
    order_for=None,
    temperature: float = 1.0,
) -> list[Path]:
    """``out_dir/samples.png``: a few images drawn from ``module`` in the task's pixel
    order (``order_for(n, generator)``; a warning, no file, when it cannot be sampled)."""

    def make():
        generator = torch.Generator().manual_seed(seed)
        order = order_for(num_samples, generator) if order_for is not None else None
        images = generate_images(module, num_samples, temperature, generator, order)
        return [save_image_grid(images, Path(out_dir) / "samples.png")]

    return report_or_warn(make, "samples.png")
