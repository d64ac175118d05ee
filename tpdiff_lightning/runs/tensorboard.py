"""TensorBoard curves that stay monotone across a resume: events past the resumed step are purged.

A run killed at step n after its last checkpoint at step k < n has already written events for steps k..n.
The resumed run logs those steps again. ``SummaryWriter(purge_step=k)`` writes a marker that makes TensorBoard
drop every earlier-written event at step >= k, so each step appears once and the curves never go backwards.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.loggers import TensorBoardLogger


def resumed_step(checkpoint_path: str | Path) -> int:
    """The first logger step a run resumed from this checkpoint logs: its ``global_step`` (the run logs each
    optimizer step at the count of steps taken before it)."""
    return int(torch.load(checkpoint_path, map_location="cpu", weights_only=False, mmap=True)["global_step"])


def purge_tensorboard_after(trainer, step: int) -> list[TensorBoardLogger]:
    """Make each of the trainer's TensorBoard loggers open its writer with ``purge_step=step``; returns them.

    The writer is created lazily on first use, so this must run before the run logs anything. The logger
    passes its extra keyword arguments to ``SummaryWriter``; ``purge_step`` is one of them.
    """
    purged = []
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            if logger._experiment is not None:
                raise RuntimeError("the TensorBoard writer is already open; purge_step must be set before it opens")
            logger._kwargs["purge_step"] = step
            purged.append(logger)
    return purged


def purge_step_of(logger) -> int | None:
    """The step from which ``purge_tensorboard_after`` makes this logger's writer purge, or ``None``."""
    return getattr(logger, "_kwargs", {}).get("purge_step")


def log_into_subrun(trainer, name: str) -> list[TensorBoardLogger]:
    """Open each TensorBoard logger's writer in the sub-run ``<run folder>/<name>`` (``validate``): a ``validate`` on
    a checkpoint then never writes a step below the training run's last into the run's own event files, which
    TensorBoard would read as a restart and answer by dropping every training-time point past that step. The run
    folder itself (``trainer.log_dir``: configs, predictions) stays where it is."""
    from torch.utils.tensorboard import SummaryWriter

    opened = []
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger) and logger._experiment is None:
            logger._experiment = SummaryWriter(log_dir=str(Path(logger.log_dir) / name), **logger._kwargs)
            opened.append(logger)
    return opened
