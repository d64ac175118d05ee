"""``--ckpt_path last`` that finds the last good state: the newest checkpoint of the run that loads.

``last.ckpt`` can be missing (a run killed before its first save, a link whose target was removed) or
unreadable (a file torn by a crash on an older version of the project, a full disk). Then the newest step
checkpoint that loads is used instead, and the user is told which and why. Only when checkpoints exist and
none of them loads does the resume stop, with one line per file saying what is wrong with it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

LAST_NAME = re.compile(r"^last(-v\d+)?\.ckpt$")
STEP_IN_NAME = re.compile(r"step=(\d+)")


class NoLoadableCheckpointError(RuntimeError):
    """Checkpoints exist for the run, but none of them loads."""


class UnusableCheckpointError(ValueError):
    """A ``--ckpt_path`` file that does not load."""


class FreshFitOverCheckpointsError(RuntimeError):
    """A ``fit`` without ``ckpt_path`` into a run folder that already holds checkpoints."""


def refuse_fresh_fit_over_checkpoints(folders: list[Path]) -> None:
    """A new run must not mix its checkpoints and curves with an earlier run's: raise when ``folders`` hold any."""
    found = sorted(p for folder in folders if folder.is_dir() for p in folder.glob("*.ckpt"))
    if found:
        raise FreshFitOverCheckpointsError(
            f"{found[0].parent} already holds {len(found)} checkpoint(s) of an earlier run (e.g. {found[-1].name}); "
            "resume with --ckpt_path last, or choose another version (--trainer.logger.init_args.version)")


@dataclass
class ResumePoint:
    path: Path
    global_step: int
    reason: str | None  # why this is not the run's last.ckpt; None when it is


def checkpoint_folders(trainer) -> list[Path]:
    """The folders the trainer's ``ModelCheckpoint`` callbacks write to, by Lightning's rule: the callback's
    ``dirpath``, else ``<save_dir>/<name>/<version>/checkpoints`` of the first logger, else
    ``<default_root_dir>/checkpoints``."""
    folders = []
    for callback in trainer.checkpoint_callbacks:
        dirpath = getattr(callback, "dirpath", None)
        if dirpath is None and trainer.loggers:
            logger = trainer.loggers[0]
            save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
            version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
            dirpath = os.path.join(save_dir, str(logger.name), version, "checkpoints")
        elif dirpath is None:
            dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        if Path(dirpath) not in folders:
            folders.append(Path(dirpath))
    return folders


def sharded_checkpoint_file(folder: Path) -> tuple[Path | None, str]:
    """The file of a sharded checkpoint folder that holds the training state (``global_step`` and the rest),
    and what kind of folder it is: ``meta.pt`` beside the ``.distcp`` shards (FSDP and FSDP2) or DeepSpeed's
    ``checkpoint/mp_rank_00_model_states.pt`` (its client state). ``(None, why)`` for any other folder."""
    if (folder / "meta.pt").is_file():
        if not (folder / ".metadata").is_file():
            return None, "is a sharded checkpoint folder without its .metadata (an interrupted save)"
        return folder / "meta.pt", "sharded"
    states = sorted((folder / "checkpoint").glob("*model_states.pt")) if (folder / "checkpoint").is_dir() else []
    if states:
        return states[0], "deepspeed"
    return None, "is a folder that holds no checkpoint (no meta.pt, no DeepSpeed checkpoint/)"


def load_problem(path: Path) -> tuple[int | None, str | None]:
    """``(global_step, None)`` when ``path`` loads as a training checkpoint (a file, or a sharded checkpoint
    folder), else ``(None, what is wrong)``."""
    if not path.exists():
        return None, "is missing" if not path.is_symlink() else f"links to the missing {os.readlink(path)}"
    sharded = path.is_dir()
    if sharded:
        state_file, kind = sharded_checkpoint_file(path)
        if state_file is None:
            return None, kind
        path = state_file
    if path.stat().st_size == 0:
        return None, "is empty (0 bytes)"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:  # a torn zip archive, an EOF, a pickle error: all mean "does not load"
        return None, f"is unreadable ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    needed = ("global_step",) if sharded else ("state_dict", "global_step")  # shards hold the weights
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in needed):
        return None, f"is not a training checkpoint (no {' or '.join(needed)})"
    return int(checkpoint["global_step"]), None


def _name_step(path: Path) -> int:
    match = STEP_IN_NAME.search(path.name)
    return int(match.group(1)) if match else -1


def find_resume_point(folders: list[Path]) -> ResumePoint | None:
    """The checkpoint ``--ckpt_path last`` resumes from: ``last.ckpt`` when it loads and no step checkpoint is
    newer, else the newest step checkpoint that loads. ``None`` when the folders hold no checkpoint at all.

    Raises:
        NoLoadableCheckpointError: checkpoints exist, none of them loads.
    """
    lasts = [folder / "last.ckpt" for folder in folders]
    lasts += sorted((p for folder in folders if folder.is_dir() for p in folder.iterdir()
                     if LAST_NAME.match(p.name) and p.name != "last.ckpt"), key=lambda p: p.name)
    steps = sorted((p for folder in folders if folder.is_dir() for p in folder.glob("*.ckpt")
                    if not LAST_NAME.match(p.name) and not p.name.startswith(".")),
                   key=lambda p: (_name_step(p), p.stat().st_mtime), reverse=True)
    if not steps and not any(p.exists() or p.is_symlink() for p in lasts):
        return None
    problems: dict[Path, str] = {}
    best: ResumePoint | None = None
    for last in lasts:
        step, problem = load_problem(last)
        if problem is None and (best is None or step > best.global_step):
            best = ResumePoint(last, step, None)
        elif problem is not None and (last.exists() or last.is_symlink() or last.name == "last.ckpt"):
            problems[last] = problem
    for path in steps:
        if best is not None and _name_step(path) <= best.global_step and _name_step(path) >= 0:
            break  # named by step and not newer than what we have
        step, problem = load_problem(path)
        if problem is not None:
            problems[path] = problem
            continue
        if best is None or step > best.global_step:
            why = "; ".join(f"{p.name} {what}" for p, what in problems.items()) or \
                f"it is newer than last.ckpt (step {best.global_step})"
            best = ResumePoint(path, step, why)
        break
    if best is None:
        raise NoLoadableCheckpointError(
            "ckpt_path=last: no checkpoint of this run loads: "
            + "; ".join(f"{p} {what}" for p, what in problems.items())
            + ". Start a new run (another logger version), or pass --ckpt_path with a checkpoint that loads")
    return best


def resume_message(point: ResumePoint) -> str:
    """One line: which checkpoint the run resumes from instead of last.ckpt, and why."""
    return (f"ckpt_path=last: {point.reason}; resuming from {point.path} (global step {point.global_step}), "
            "the newest checkpoint that loads")
