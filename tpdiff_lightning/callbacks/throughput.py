"""Logs how many clips (``data/clips_per_s``) and, with token-budget batches, tokens (``data/tokens_per_s``) per
second reach the training step, and which buckets the batches came from (``data/buckets``, a histogram)."""

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
        self._clips = self._tokens = 0
        self._buckets: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if "bucket_index" in batch:
            self._buckets.append(int(batch["bucket_index"]))
        if self._start is None:
            self._start = now
            return
        self._clips += len(batch["caption"])
        self._tokens += int(batch.get("tokens", 0))
        if self._clips and batch_idx % self.every_n_batches == 0:
            seconds = now - self._start
            pl_module.log("data/clips_per_s", self._clips / seconds, on_step=True, on_epoch=False)
            if self._tokens:
                pl_module.log("data/tokens_per_s", self._tokens / seconds, on_step=True, on_epoch=False)
            self.log_buckets(trainer)
            self._start, self._clips, self._tokens = now, 0, 0

    def log_buckets(self, trainer) -> None:
        """The buckets of the batches since the last point, as a TensorBoard histogram of bucket indices (their
        order in ``data.init_args.buckets``)."""
        logger = getattr(trainer, "logger", None)
        experiment = getattr(logger, "experiment", None) if logger is not None else None
        if self._buckets and trainer.is_global_zero and hasattr(experiment, "add_histogram"):
            import numpy as np

            experiment.add_histogram("data/buckets", np.asarray(self._buckets), trainer.global_step,
                                     bins=np.arange(max(self._buckets) + 2) - 0.5)
        self._buckets = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # Validation and checkpoints between epochs are not data time.
        self._start, self._clips, self._tokens = None, 0, 0
