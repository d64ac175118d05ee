"""Command-line errors in one line: the setting, the value and what was expected, without a traceback.

jsonargparse reports a bad value as a nested tree (every union branch, the whole parsed namespace); an
exception inside a class's ``__init__`` or the run comes with a long traceback. Both are reduced to one line
on stderr and a non-zero exit. ``--traceback`` on the command line, or ``TPDIFF_TRACEBACK=1`` in the
environment, shows the full error instead.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from pathlib import Path

import yaml

from tpdiff_lightning.training.flat_settings import moved_class_message, moved_setting_message
from tpdiff_lightning.training.settings import GROUPS

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


_SUBTYPE = re.compile(r"typing\.Literal\[([^\]]*)\]|<class '(\w+)'>")
_NOT_ACCEPTED = re.compile(r"Option '([\w.]+)' is not accepted")
_CLASS_PATH = re.compile(r"Problem with given class_path '([\w.]+)'")
_UNRECOGNIZED = re.compile(r"unrecognized arguments: --([\w.]+)")


def literal_choices(message: str) -> list[str] | None:
    """The values a union of ``Literal`` types accepts (``trainer.precision``), from jsonargparse's ``Subtypes:``
    line; ``None`` when a subtype is anything but a literal or ``None``."""
    line = next((raw for raw in message.splitlines() if raw.strip().startswith("Subtypes:")), None)
    if line is None:
        return None
    choices: list[str] = []
    for literal, name in _SUBTYPE.findall(line):
        if name and name != "NoneType":
            return None
        for value in (v.strip().strip("'\"") for v in literal.split(",") if literal):
            if value not in choices:
                choices.append(value)
    strings = [c for c in choices if not c.isdigit()]
    return strings + [c for c in choices if c.isdigit() and c not in strings] if choices else None


def _parameters(class_path: str) -> list[str]:
    """A class's settings as dotted names under its ``init_args``: its parameters, and the fields of those typed as a
    settings dataclass (``optimization.lr``)."""
    import dataclasses
    import importlib
    import inspect
    import typing

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        names = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
        hints = typing.get_type_hints(cls.__init__)
    except (ImportError, AttributeError, ValueError, TypeError, NameError):
        return []
    nested = [f"{p}.{f.name}" for p in names if dataclasses.is_dataclass(hints.get(p))
              for f in dataclasses.fields(hints[p])]
    return names + nested


def _known_keys(prefix: str) -> list[str]:
    """Settings under a top-level group of the command line, for suggestions."""
    if prefix == "trainer":
        return _parameters("lightning.pytorch.Trainer")
    return []


def nearest(name: str, candidates: list[str]) -> str | None:
    """The candidate closest to ``name``, comparing ``name`` with each candidate's last dotted part too."""
    import difflib

    by_leaf = {c.rsplit(".", 1)[-1]: c for c in candidates}
    close = difflib.get_close_matches(name, [*candidates, *by_leaf], n=1, cutoff=0.6)
    return (by_leaf.get(close[0], close[0])) if close else None


def suggestion(message: str, key: str = "") -> str:
    """`` (did you mean ...?)`` for an option that is not accepted, or ``""``."""
    option = _NOT_ACCEPTED.search(message)
    class_path = _CLASS_PATH.search(message)
    if option and class_path:
        close = nearest(option.group(1), _parameters(class_path.group(1)))
        return f"; did you mean {key + '.' if key else ''}{close}?" if close else ""
    unknown = _UNRECOGNIZED.search(message)
    if unknown and "." in unknown.group(1):
        prefix, _, name = unknown.group(1).partition(".")
        close = nearest(name, _known_keys(prefix))
        return f"; did you mean --{prefix}.{close}?" if close else ""
    return ""


def condense_argument_error(message: str) -> str:
    """The useful line of a jsonargparse error, prefixed by the dotted key it is about.

    ``Parser key "model": ... class_path ...: Parser key "lr": Expected a <class 'float'>. Got value: abc``
    becomes ``model.init_args.optimization.lr: expected a float. Got value: abc``. Branches that only say a value is not
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
    choices = literal_choices(message)
    given = next((raw.strip()[len("Given value:"):].strip() for raw in message.splitlines()
                  if raw.strip().startswith("Given value:")), None)
    if choices is not None:
        detail = f"expected one of {', '.join(choices)}" + (f". Got value: {given}" if given is not None else "")
    key = ".".join(keys)
    detail += suggestion(message, key)
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


def usage_line(path: Path) -> str | None:
    """The command a config file's comment shows it is used with (its first line naming ``lightning_cli.py``)."""
    for line in path.read_text().splitlines():
        if line.startswith("#") and "lightning_cli.py" in line and "--config" in line:
            return line.lstrip("# ").strip()
    return None


def check_overlays_stand_on_a_base(argv: list[str], configs: list[tuple[Path, dict]]) -> None:
    """An overlay (a config that changes a few keys of another, with no model of its own) given alone fails deep in
    the parser ("trainer.logger: Not a valid subclass of Logger"); say which base it goes on instead."""
    if any(arg == "--model" or arg.startswith(("--model=", "--model.class_path")) for arg in argv):
        return
    if not configs or any("class_path" in ((config or {}).get("model") or {}) for _, config in configs):
        return
    path = configs[0][0]
    usage = usage_line(path)
    shown = f"; use it as its usage line says: {usage}" if usage else "; give its base config first"
    raise ConfigFileError(f"--config {path} is an overlay (it changes a few settings of a base config and names no "
                          f"model){shown}")


def _class_paths(tree, where: str):
    """Every ``class_path`` value in a parsed YAML tree, with the dotted key it sits under."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key == "class_path" and isinstance(value, str):
                yield value, where
            else:
                yield from _class_paths(value, f"{where}.{key}" if where else str(key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _class_paths(value, f"{where}[{i}]")


def check_moved_settings(argv: list[str], configs: list[tuple[Path, dict]]) -> None:
    """A model setting named the flat way of release 0.1.0 (``model.init_args.lr``), or a class whose module moved,
    is one line saying where it went, not a parser dump."""
    for path, config in configs:
        init_args = (((config or {}).get("model") or {}).get("init_args")) or {}
        for key in init_args:
            if (message := moved_setting_message(key, f"--config {path}")) is not None:
                raise ConfigFileError(message)
        for class_path, where in _class_paths(config or {}, ""):
            if (message := moved_class_message(class_path, f"--config {path}, {where}")) is not None:
                raise ConfigFileError(message)
    for arg in argv:
        match = re.match(r"--model\.(?:init_args\.)?([a-z_]+)(?:=|$)", arg)
        if match and (message := moved_setting_message(match.group(1), arg.split("=")[0])) is not None:
            raise ConfigFileError(message)
        match = re.match(r"--model\.init_args\.([a-z_]+)\.([a-z_]+)(?:=|$)", arg)
        if match and match.group(1) in GROUPS:  # nested keys would otherwise be taken abbreviated
            group, field = match.groups()
            known = [f.name for f in dataclasses.fields(GROUPS[group])]
            if field not in known:
                close = nearest(field, known)
                raise ConfigFileError(f"model.init_args.{group}.{field} is not a setting" +
                                      (f"; did you mean model.init_args.{group}.{close}?" if close else
                                       f"; expected one of {known}"))


def check_config_files(argv: list[str]) -> None:
    """Raise ``ConfigFileError`` naming the file when a ``--config`` file is missing or not valid YAML, or is an
    overlay given without the base config it goes on."""
    configs = []
    for path in config_paths(argv):
        if not path.is_file():
            raise ConfigFileError(f"--config {path}: no such file")
        try:
            config = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigFileError(f"--config {path}: not valid YAML{where}: {problem}") from error
        configs.append((path, config))
    check_moved_settings(argv, configs)
    check_overlays_stand_on_a_base(argv, configs)


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
