"""A test-only Lightning callback that makes a training run slow from a given meta-step on,
so that a test can kill or signal it at a known point of its run (added on the command
line with ``+callbacks.slow._target_=slow_steps.SlowSteps``, ``PYTHONPATH=tests``)."""

from __future__ import annotations

import time
from pathlib import Path

import pytorch_lightning as pl


class SlowSteps(pl.Callback):
    """From meta-step ``after_step`` on, sleep ``seconds`` after every meta-step.

    On reaching ``after_step`` it writes ``marker`` (its content: the step), the test's
    cue that the run is past the checkpoints before that step. A run that starts when the
    marker already exists (the resumed run) is not slowed down.
    """

    def __init__(self, after_step: int, seconds: float, marker: str) -> None:
        self.after_step = after_step
        self.seconds = seconds
        self.marker = Path(marker)
        self.active = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.active = not self.marker.exists()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.active or trainer.global_step < self.after_step:
            return
        if trainer.global_step == self.after_step:
            self.marker.write_text(str(trainer.global_step))
        time.sleep(self.seconds)
