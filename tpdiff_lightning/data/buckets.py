"""Buckets by shape: clips of many aspect ratios and lengths trained at a few (frames, height, width) shapes.

A clip goes to the bucket nearest its aspect ratio among those whose frame count it covers, is resized to cover
that bucket and centre-cropped, so a portrait clip trains as a portrait clip instead of losing most of its frame
to a landscape crop. Which bucket is decided from the clip's size and length before its frames are decoded.

    python -m tpdiff_lightning.data.buckets --resolution 480 832 --frames 49 81 --multiple 16
        # prints an equal-area bucket set (YAML) for data.init_args.buckets
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

DEFAULT_ASPECTS = (9 / 16, 3 / 4, 1.0, 4 / 3, 16 / 9)
"""Width / height of the generated buckets: portrait 9:16 and 3:4, square, landscape 4:3 and 16:9."""


@dataclass(frozen=True, order=True)
class Bucket:
    """One training shape, in video frames and pixels."""

    frames: int
    height: int
    width: int

    @property
    def aspect(self) -> float:
        return self.width / self.height

    def __str__(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"


def parse_buckets(value: Iterable[Sequence[int]], key: str = "data.init_args.buckets") -> list[Bucket]:
    """``[[frames, height, width], ...]`` as buckets; one line naming the entry for anything else."""
    buckets = []
    for n, entry in enumerate(value):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in entry)):
            raise ValueError(f"{key}[{n}]={entry!r} is invalid; expected [frames, height, width], positive integers")
        buckets.append(Bucket(*entry))
    if not buckets:
        raise ValueError(f"{key}=[] is invalid; expected at least one [frames, height, width], or null for none")
    if len(set(buckets)) != len(buckets):
        raise ValueError(f"{key} lists a shape twice: {[str(b) for b in buckets]}")
    return buckets


def equal_area_buckets(resolution: tuple[int, int], frames: Sequence[int], multiple: int,
                       aspects: Sequence[float] = DEFAULT_ASPECTS) -> list[Bucket]:
    """Buckets of about the area of ``resolution`` (height, width) at each aspect ratio and frame count, each
    side a multiple of ``multiple`` (the VAE factor x the patch x the largest spatial stride)."""
    area = resolution[0] * resolution[1]
    shapes = []
    for aspect in aspects:
        height = max(multiple, round(math.sqrt(area / aspect) / multiple) * multiple)
        width = max(multiple, round(height * aspect / multiple) * multiple)
        shapes.append((height, width))
    return [Bucket(f, h, w) for f in frames for h, w in dict.fromkeys(shapes)]


def nearest_bucket(frames: int, height: int, width: int, buckets: Sequence[Bucket], frame_step: int = 1
                   ) -> Bucket | None:
    """The bucket for a clip of ``frames`` frames of ``height x width``: among the buckets whose span
    (``(F - 1) * frame_step + 1`` frames) the clip covers, the nearest in log aspect ratio, the longest of equals;
    None when the clip is shorter than every bucket."""
    fitting = [b for b in buckets if (b.frames - 1) * frame_step + 1 <= frames]
    if not fitting:
        return None
    aspect = math.log(width / height)
    return min(fitting, key=lambda b: (round(abs(math.log(b.aspect) - aspect), 9), -b.frames, b))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print an equal-area bucket set for data.init_args.buckets.")
    parser.add_argument("--resolution", type=int, nargs=2, required=True, metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--frames", type=int, nargs="+", required=True, help="video frames of each length")
    parser.add_argument("--multiple", type=int, default=16, help="each side a multiple of this (VAE x patch x "
                                                                 "the largest spatial stride)")
    parser.add_argument("--aspects", type=float, nargs="+", default=list(DEFAULT_ASPECTS), help="width / height")
    args = parser.parse_args(argv)
    print("buckets:")
    for b in equal_area_buckets(tuple(args.resolution), args.frames, args.multiple, args.aspects):
        print(f"  - [{b.frames}, {b.height}, {b.width}]   # aspect {b.aspect:.2f}")


if __name__ == "__main__":
    main()
