"""A training progress bar that counts optimizer steps against ``max_steps``, across epochs and resumes.

Lightning's bar counts the batches of the current epoch against the epoch's length and reads "Epoch 3/-2" when
``max_epochs`` is -1; a run here is set by ``max_steps`` over an endless stream cut into epochs, so that bar
says nothing about how far the run is.
"""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` whose training bar is ``global_step / max_steps`` (or the estimated total of optimizer
    steps when the run is set by epochs), starting at the resumed step. Validation and prediction bars are
    Lightning's. Arguments are ``TQDMProgressBar``'s."""

    @staticmethod
    def total_steps(trainer) -> int | None:
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return int(trainer.max_steps)
        estimated = trainer.estimated_stepping_batches
        return int(estimated) if math.isfinite(estimated) else None

    def on_train_start(self, trainer, *_: Any) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        bar = self.train_progress_bar
        bar.reset(total=self.total_steps(trainer))
        bar.initial = 0
        bar.set_description("step")
        bar.n = trainer.global_step  # a resumed run starts where it was
        bar.refresh()

    def on_train_epoch_start(self, trainer, *_: Any) -> None:
        pass  # one bar for the whole run, not one per epoch of the stream

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar = self.train_progress_bar
        step = trainer.global_step
        if bar is not None and self._should_update(step, bar.total):
            bar.n = step
            bar.refresh()
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
