"""Command-line errors in one line: the setting, the value and what was expected, without a traceback.

jsonargparse reports a bad value as a nested tree (every union branch, the whole parsed namespace); an
exception inside a class's ``__init__`` or the run comes with a long traceback. Both are reduced to one line
on stderr and a non-zero exit. ``--traceback`` on the command line, or ``TPDIFF_TRACEBACK=1`` in the
environment, shows the full error instead.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import yaml

TRACEBACK_FLAG = "--traceback"
TRACEBACK_ENV = "TPDIFF_TRACEBACK"

_KEY = re.compile(r'^(?:- )?(?:Parser key|Key) "([^"]+)":?$')
_STRUCTURE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value type:",
              "Given value:", "Problem with given class_path")
_CLASS = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>")


class ConfigFileError(ValueError):
    """A ``--config`` file that is missing or not valid YAML."""


def wants_traceback(argv: list[str]) -> bool:
    return TRACEBACK_FLAG in argv or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def condense_argument_error(message: str) -> str:
    """The useful line of a jsonargparse error, prefixed by the dotted key it is about.

    ``Parser key "model": ... class_path ...: Parser key "lr": Expected a <class 'float'>. Got value: abc``
    becomes ``model.init_args.lr: expected a float. Got value: abc``. Branches that only say a value is not
    ``None`` are dropped."""
    keys: list[str] = []
    detail = None
    for raw in message.splitlines():
        line = raw.strip()
        if line.startswith("- "):
            line = line[2:]
        if not line or line == "Expected a <class 'NoneType'>":
            continue
        match = _KEY.match(line)
        if match:
            keys.append(match.group(1))
            continue
        if line.startswith("Problem with given class_path"):
            keys.append("init_args")
            continue
        if line.startswith(_STRUCTURE):
            continue
        detail = line
        break
    if detail is None:
        detail = message.strip().splitlines()[0] if message.strip() else "invalid arguments"
    detail = _CLASS.sub(lambda m: m.group(1), detail).replace("a int", "an int")
    detail = detail[0].lower() + detail[1:] if detail.startswith("Expected") else detail
    key = ".".join(keys)
    return f"{key}: {detail}" if key and not detail.startswith(keys[-1]) else detail


def config_paths(argv: list[str]) -> list[Path]:
    """The files given with ``--config``/``-c`` in ``argv``."""
    paths = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            paths.append(Path(argv[i + 1]))
        elif arg.startswith("--config="):
            paths.append(Path(arg.split("=", 1)[1]))
    return paths


def check_config_files(argv: list[str]) -> None:
    """Raise ``ConfigFileError`` naming the file when a ``--config`` file is missing or not valid YAML."""
    for path in config_paths(argv):
        if not path.is_file():
            raise ConfigFileError(f"--config {path}: no such file")
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigFileError(f"--config {path}: not valid YAML{where}: {problem}") from error


def one_line(error: BaseException) -> str:
    """The error as one line for the terminal."""
    from argparse import ArgumentError

    text = str(error)
    if isinstance(error, ConfigFileError):
        return text
    if isinstance(error, ArgumentError) or "Does not validate against any of the Union subtypes" in text:
        return condense_argument_error(text)
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if type(error).__module__.startswith("tpdiff_lightning.") and first:
        return first  # the project's own errors say what is wrong in their message
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def report_and_exit(error: BaseException, code: int = 1) -> None:
    """Print ``error: <one line>`` (with a hint for the full traceback) and exit with ``code``."""
    sys.stderr.write(f"error: {one_line(error)}  [{TRACEBACK_FLAG} or {TRACEBACK_ENV}=1 shows the traceback]\n")
    raise SystemExit(code)
