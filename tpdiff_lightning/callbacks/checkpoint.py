"""ModelCheckpoint whose ``last.ckpt`` is a link to the step checkpoint just written, replaced atomically."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal

from lightning.pytorch.callbacks import ModelCheckpoint

from tpdiff_lightning.runs.checkpoint_io import temp_path_for


class LinkedLastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that keeps ``last.ckpt`` as a relative symlink to the newest step checkpoint
    (``save_last="link"``, the default here) instead of a second full copy of the same state.

    Lightning removes the old link and then creates the new one; here the new link is made under a temporary
    name and renamed over the old one, so ``last.ckpt`` never goes missing. Where symlinks are not allowed the
    step checkpoint is copied, through the same temporary-file-and-rename. All other arguments are
    ``ModelCheckpoint``'s.
    """

    def __init__(self, *args, save_last: bool | Literal["link"] | None = "link", **kwargs):
        super().__init__(*args, save_last=save_last, **kwargs)

    @staticmethod
    def _link_checkpoint(trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            link_last_checkpoint(Path(filepath), Path(linkpath))
        trainer.strategy.barrier()

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        # One last.ckpt, always the newest. Lightning versions the name (last-v1.ckpt) when last.ckpt exists and
        # is not the path its state remembers, which after a resume from a checkpoint saved before the first link
        # (or from another dirpath spelling) left a stale last.ckpt beside last-v1.ckpt.
        if self.save_last:
            self.last_model_path = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        super()._save_last_checkpoint(trainer, monitor_candidates)

    def on_train_end(self, trainer, pl_module) -> None:
        # A run that stops between saves (max_steps not a multiple of every_n_train_steps) keeps its last steps.
        if self._last_global_step_saved != trainer.global_step and not self._should_skip_saving_checkpoint(trainer) \
                and self.save_top_k != 0:
            save_checkpoint_now(self, trainer)
        super().on_train_end(trainer, pl_module)


def save_checkpoint_now(callback: ModelCheckpoint, trainer) -> str:
    """Save the trainer's current state through ``callback`` (its folder, file name and top-k bookkeeping) and
    point its ``last.ckpt`` at it, outside the callback's schedule; returns the file. Every rank must call it."""
    candidates = callback._monitor_candidates(trainer)
    if callback.monitor is None:
        callback._save_topk_checkpoint(trainer, candidates)
    else:  # a monitored metric may not rank this state among the top k; it is saved all the same
        callback._save_checkpoint(trainer, callback._get_metric_interpolated_filepath_name(candidates, trainer))
    callback._save_last_checkpoint(trainer, candidates)
    return callback._last_checkpoint_saved


def link_last_checkpoint(target: Path, link: Path) -> None:
    """Make ``link`` (``last.ckpt``) a relative symlink to ``target``, replacing it atomically: the new link is made
    under a temporary name and renamed over the old one, so ``last.ckpt`` never goes missing. Where symlinks are
    not allowed, ``target`` is copied through the same temporary-name-and-rename."""
    temp = temp_path_for(link)
    temp.unlink(missing_ok=True)
    try:
        try:
            os.symlink(os.path.relpath(target, link.parent), temp)
        except OSError:  # no symlinks here (some Windows accounts): a whole copy instead
            if os.path.isdir(target):  # a sharded checkpoint folder
                shutil.copytree(target, temp)
            else:
                shutil.copyfile(target, temp)
        if link.is_dir() and not link.is_symlink():
            # a real last.ckpt/ folder (a sharded run saved before last.ckpt became a link): a folder
            # cannot be renamed over, so it goes first; the step checkpoint it duplicated stays
            shutil.rmtree(link)
        os.replace(temp, link)
    except BaseException:
        if temp.is_dir() and not temp.is_symlink():
            shutil.rmtree(temp, ignore_errors=True)
        else:
            temp.unlink(missing_ok=True)
        raise
