"""ModelCheckpoint whose ``last.ckpt`` is a link to the step checkpoint just written, replaced atomically."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal

from lightning.pytorch.callbacks import ModelCheckpoint

from tpdiff_lightning.checkpoint_io import temp_path_for


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
            link = Path(linkpath)
            temp = temp_path_for(link)
            temp.unlink(missing_ok=True)
            try:
                try:
                    os.symlink(os.path.relpath(filepath, link.parent), temp)
                except OSError:  # no symlinks here (some Windows accounts): a whole copy instead
                    if os.path.isdir(filepath):  # a sharded checkpoint folder
                        shutil.copytree(filepath, temp)
                    else:
                        shutil.copyfile(filepath, temp)
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
        trainer.strategy.barrier()
