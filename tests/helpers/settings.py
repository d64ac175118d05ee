"""Settings groups for tests: a test's defaults per group, overridden field by field."""

from __future__ import annotations

from typing import Any


def merged(defaults: dict[str, dict[str, Any]], overrides: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` (``{"clip": {...}, "sampling": {...}}``) with ``overrides`` laid over them: a settings group
    given as a dict updates the default group field by field; anything else (a backbone, a codec) replaces."""
    out: dict[str, Any] = {name: dict(fields) for name, fields in defaults.items()}
    for name, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(name), dict):
            out[name] = {**out[name], **value}
        else:
            out[name] = value
    return out
