"""One run folder, one run: a lock file holding the training process's pid.

``fit`` takes ``<run folder>/.run.lock`` before it writes anything and removes it when it ends. A second ``fit``
into the same folder while the first is alive is refused; a lock left by a process that no longer exists
(killed, or on a crashed machine's pid), or by an earlier attempt of the same scheduler job (a SLURM requeue,
possibly on another node: the lock records ``SLURM_JOB_ID`` or torchrun's run id), is taken over with a warning.
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


JOB_ID_VARIABLES = ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "LSB_JOBID", "PBS_JOBID")


def job_id() -> str | None:
    """The scheduler's id of this job, kept across a requeue (SLURM, torchrun, LSF, PBS), or None."""
    for name in JOB_ID_VARIABLES:
        value = os.environ.get(name)
        if value and value != "none":
            return f"{name}={value}"
    return None


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
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "job": job_id()})
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder() or {}
                pid, host = holder.get("pid"), holder.get("host")
                same_host = host == socket.gethostname()
                # The same scheduler job (a requeued SLURM job, possibly on another node) left it: stale.
                own_job = job_id() is not None and holder.get("job") == job_id()
                if isinstance(pid, int) and pid != os.getpid() and not own_job and (not same_host or _alive(pid)):
                    raise RunFolderInUseError(
                        f"run folder {self.path.parent} is in use by pid {pid} on {host} (lock file {self.path}); "
                        "wait for that run to end, or choose another logger version") from None
                why = f"on {host}, an earlier attempt of this job" if own_job else "which no longer runs"
                warnings.warn(f"{self.path}: taking over the lock of pid {pid}, {why}", stacklevel=2)
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
