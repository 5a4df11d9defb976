"""Lightning callbacks of the project."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

__all__ = ["LastCheckpoint"]


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt``: the latest training state, every ``every_n_train_steps`` meta-steps
    and at the end of training, whatever the validation metric does.

    Lightning's own ``save_last=True`` only refreshes ``last.ckpt`` when a top-k
    checkpoint is written, so a run whose validation stops improving (or turns NaN) keeps
    an old ``last.ckpt``: useless for resuming.
    """

    def __init__(self, dirpath: str, every_n_train_steps: int, filename: str = "last") -> None:
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=None,
            save_top_k=1,
            save_last=False,
            every_n_train_steps=every_n_train_steps,
            enable_version_counter=False,
            auto_insert_metric_name=False,
        )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if (
            not self._should_skip_saving_checkpoint(trainer)
            and self._last_global_step_saved != trainer.global_step
        ):
            self._save_none_monitor_checkpoint(trainer, self._monitor_candidates(trainer))
