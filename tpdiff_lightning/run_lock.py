"""One run folder, one run: a lock file holding the training process's pid.

``fit`` takes ``<run folder>/.run.lock`` before it writes anything and removes it when it ends. A second ``fit``
into the same folder while the first is alive is refused; a lock left by a process that no longer exists
(killed, or on a crashed machine's pid) is taken over with a warning.
"""

from __future__ import annotations

import json
import os
import socket
import warnings
from pathlib import Path

LOCK_NAME = ".run.lock"


class RunFolderInUseError(RuntimeError):
    """Another live process trains into this run folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunFolderLock:
    """The lock of one run folder; :meth:`acquire` takes it or raises :class:`RunFolderInUseError`."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_NAME
        self.held = False

    def holder(self) -> dict | None:
        """The ``{"pid", "host"}`` recorded in the lock file, or None when there is none (or it is unreadable)."""
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder() or {}
                pid, host = holder.get("pid"), holder.get("host")
                same_host = host == socket.gethostname()
                if isinstance(pid, int) and pid != os.getpid() and (not same_host or _alive(pid)):
                    raise RunFolderInUseError(
                        f"run folder {self.path.parent} is in use by pid {pid} on {host} (lock file {self.path}); "
                        "wait for that run to end, or choose another logger version") from None
                warnings.warn(f"{self.path}: taking over the lock of pid {pid}, which no longer runs", stacklevel=2)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(record)
            self.held = True
            return
        raise RunFolderInUseError(f"could not take the lock {self.path}: another process took it at the same time")

    def release(self) -> None:
        if self.held:
            holder = self.holder() or {}
            if holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False
