"""The sine task's report: learning curve and fit plots of a tested module."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.func import functional_call

from reptile_gen.data.task_batch import TaskBatch
from reptile_gen.reports.plots import plot_learning_curves, plt
from reptile_gen.utils.stats import mean_and_ci95

__all__ = ["write_sine_report"]


def write_sine_report(module, datamodule, out_dir, num_tasks: int = 3) -> list[Path]:
    """Learning curve and fit plots of a tested module, into ``out_dir``.

    * ``learning_curve.png``: test query MSE against adaptation steps (mean and 95% CI),
      with the random-initialisation baseline;
    * ``fit.png``: for a few test tasks, the true function, the prediction before and
      after adaptation, and the support points.
    """
    out_dir = Path(out_dir)
    written = []
    curves = {}
    for prefix, label in (("test", type(module).__name__), ("test/random_init", "random init")):
        losses = getattr(module, "eval_curves", {}).get(prefix)
        if losses is not None:
            stats = [mean_and_ci95(losses[:, k]) for k in range(losses.shape[1])]
            curves[label] = ([s[0] for s in stats], [s[1] for s in stats])
    if curves:
        written.append(plot_learning_curves(curves, out_dir / "learning_curve.png", log_y=True))

    datamodule.setup("test")
    tasks = datamodule.test_set[0][:num_tasks].to(module.device)
    grid = torch.linspace(*datamodule.x_range, 200, device=module.device).reshape(1, -1, 1)
    amplitude, phase = tasks.info[:, 0:1, None], tasks.info[:, 1:2, None]
    dense = TaskBatch(
        support_x=tasks.support_x,
        support_y=tasks.support_y,
        query_x=grid.expand(tasks.num_tasks, -1, -1),
        query_y=amplitude * torch.sin(grid - phase),
    )
    with torch.enable_grad():
        result = module.adapt(dense, "none", module.eval_schedule, return_adapted=True)
    with torch.no_grad():
        before = module.model(grid[0]).squeeze(-1).cpu()
        fig, axes = plt.subplots(1, tasks.num_tasks, figsize=(4 * tasks.num_tasks, 3.2))
        for b, ax in enumerate(list(axes) if tasks.num_tasks > 1 else [axes]):
            params = {k: v[b] for k, v in result.adapted.items()}
            after = functional_call(module.model, params, (grid[0],)).squeeze(-1).cpu()
            x = grid[0, :, 0].cpu()
            ax.plot(x, dense.query_y[b, :, 0].cpu(), "k-", label="ground truth")
            ax.plot(x, before, "--", label="before adaptation")
            ax.plot(x, after, "-", label=f"after {module.eval_schedule.num_steps} steps")
            ax.plot(
                tasks.support_x[b, :, 0].cpu(),
                tasks.support_y[b, :, 0].cpu(),
                "o",
                color="C3",
                label="support points",
            )
            ax.set_title(f"A={tasks.info[b, 0]:.2f}, phase={tasks.info[b, 1]:.2f}")
        axes_list = list(axes) if tasks.num_tasks > 1 else [axes]
        axes_list[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "fit.png", dpi=110)
        plt.close(fig)
    written.append(out_dir / "fit.png")
    return written
