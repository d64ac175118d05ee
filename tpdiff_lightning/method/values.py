"""What counts as a number in a setting: YAML's ``true`` is a Python ``bool``, which is also an ``int``, and a
check written as ``isinstance(v, (int, float))`` lets it through as 1."""

from __future__ import annotations

from typing import Any


def is_number(value: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_integer(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)
