"""Frame size: an ``int`` side for square frames, or ``(height, width)``."""

from __future__ import annotations

from typing import Sequence


def frame_size(resolution: int | Sequence[int]) -> tuple[int, int]:
    """``resolution`` as ``(height, width)``; raises on anything but a positive int or a pair of them."""
    if isinstance(resolution, int) and not isinstance(resolution, bool):
        size = (resolution, resolution)
    elif isinstance(resolution, (list, tuple)) and len(resolution) == 2:
        size = (int(resolution[0]), int(resolution[1]))
    else:
        raise ValueError(f"resolution={resolution!r} is invalid; expected an int or [height, width]")
    if min(size) < 1:
        raise ValueError(f"resolution={resolution!r} is invalid; expected positive sizes")
    return size
