"""Joint training: the transfer-learning baseline of the sine studies."""

from __future__ import annotations

import torch

from reptile_gen.algorithms.base import MetaLearner
from reptile_gen.data.task_batch import TaskBatch
from reptile_gen.inner_loop import masked_mean

__all__ = ["JointTraining"]


class JointTraining(MetaLearner):
    """Ordinary training on the pooled points of all tasks (no inner loop), then
    fine-tuning with the same inner optimizer and learning rate at evaluation. On sine
    waves this learns roughly the mean function (about 0) and fine-tunes poorly, which is
    the point of the comparison."""

    display_name = "joint (transfer)"
    family = "transfer"
    grad_mode = "none"
    learns_inner_lr = False

    def meta_loss(self, batch: TaskBatch):
        xs = [batch.support_x]
        ys = [batch.support_y]
        masks = [batch.support_mask]
        if batch.has_query:
            xs.append(batch.query_x)
            ys.append(batch.query_y)
            masks.append(torch.ones(batch.query_x.shape[:2], dtype=torch.bool, device=self.device))
        x, y, m = torch.cat(xs, 1), torch.cat(ys, 1), torch.cat(masks, 1)
        loss = masked_mean(self.loss_fn(self.model(x), y), m)
        return loss, {}
