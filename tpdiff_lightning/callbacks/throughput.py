"""Logs how many clips per second reach the training step (``data/clips_per_s``)."""

from __future__ import annotations

import time

import lightning as L


class ClipThroughput(L.Callback):
    """Clips per second of the training loop, from batch start to batch start, logged every N batches.

    The rate includes data loading and the step itself; a loader that keeps up shows the step rate.

    Args:
        every_n_batches: batches per logged point.
    """

    def __init__(self, every_n_batches: int = 25):
        if every_n_batches < 1:
            raise ValueError(f"every_n_batches={every_n_batches} is invalid; expected >= 1")
        self.every_n_batches = every_n_batches
        self._start: float | None = None
        self._clips = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._start is None:
            self._start = now
            return
        self._clips += len(batch["caption"])
        if self._clips and batch_idx % self.every_n_batches == 0:
            pl_module.log("data/clips_per_s", self._clips / (now - self._start), on_step=True, on_epoch=False)
            self._start, self._clips = now, 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # Validation and checkpoints between epochs are not data time.
        self._start, self._clips = None, 0
