"""Checkpoint files that are either whole or absent: written beside their target, then renamed into place.

A checkpoint is serialised into a temporary file in the target's own folder, flushed, fsynced and renamed
over the target with ``os.replace`` (atomic within one filesystem), and the folder is fsynced so the rename
survives a power loss. A failure mid-write (a full disk, an interrupt) removes the temporary file and leaves
any previous checkpoint of that name untouched; a temporary file left by a killed process is removed by the
next save into that folder.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

TEMP_SUFFIX = ".tmp"


def temp_path_for(path: Path, pid: int | None = None) -> Path:
    """The temporary file a process writes ``path`` to: hidden, in the same folder, named by the pid."""
    return path.with_name(f".{path.name}.{os.getpid() if pid is None else pid}{TEMP_SUFFIX}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the temporary checkpoint files in ``folder`` whose writing process is gone; returns them."""
    removed = []
    for temp in folder.glob(f".*{TEMP_SUFFIX}"):
        pid = temp.name[: -len(TEMP_SUFFIX)].rsplit(".", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            temp.unlink(missing_ok=True)
            removed.append(temp)
    return removed


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without folder handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class DiskFullError(OSError):
    """A checkpoint did not fit on its disk; the previous checkpoint of that name is kept."""


def _disk_full(error: BaseException) -> bool:
    """torch's zip writer reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc] . unexpected
    pos ...`` or ``PytorchStreamWriter failed writing file``, not as the ``OSError`` (ENOSPC) underneath."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("unexpected pos" in text or "failed writing file" in text
                                                or "No space left" in text)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` so that ``path`` holds either its old content or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path.parent)
    temp = temp_path_for(path)
    try:
        with open(temp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException as error:
        written = temp.stat().st_size if temp.exists() else 0
        temp.unlink(missing_ok=True)
        if _disk_full(error):
            free = shutil.disk_usage(path.parent).free
            raise DiskFullError(errno.ENOSPC, f"no space left on the disk holding {path.parent} while writing the "
                                f"checkpoint {path.name} ({written / 2**20:.1f} MiB written, {free / 2**20:.1f} MiB "
                                "free after removing the partial file); the previous checkpoint is kept. Free space "
                                "there, or save elsewhere (--trainer.logger.init_args.save_dir)") from error
        raise
    _fsync_folder(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves go through :func:`atomic_torch_save` (remote URLs are left to
    Lightning's own writer)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


def install_atomic_checkpoint_io(trainer) -> bool:
    """Give the trainer's strategy an :class:`AtomicCheckpointIO` where it would use Lightning's plain
    ``TorchCheckpointIO`` (a strategy with its own checkpoint writer, or a user's plugin, is kept)."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
        return True
    return False
