"""OpenVid-1M as webdataset shards: read `OpenVid-1M.csv`, select clips (the paper's v1 subset by default), write.

The v1 selection keeps a clip when its motion and aesthetic scores are both in the top `top_both` fraction, or
either one is in the top `top_either` fraction, with quantiles taken over the whole CSV (about 100k of 1M clips).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from tpdiff_lightning.data.shard_writing import (
    ClipSource,
    Reencode,
    add_writer_arguments,
    build_shards,
    run_builder,
    sample_key,
)

GENERATOR_NAME = "tpdiff_lightning.data.openvid"
# Column name -> type; the published CSV spells the score columns with spaces.
COLUMNS = {
    "video": str,
    "caption": str,
    "aesthetic score": float,
    "motion score": float,
    "temporal consistency score": float,
    "camera motion": str,
    "frame": int,
    "fps": float,
    "seconds": float,
}
SELECTIONS = ("v1", "all")
# Source clips are mostly 1080p and several MB each, so this gives tars of about 1 GB.
CLIPS_PER_SHARD = 100


def _typed_row(row: dict, line: int) -> dict:
    """Convert one CSV row to its column types, or raise ValueError naming the line, column and value."""
    typed = {}
    for name, kind in COLUMNS.items():
        try:
            # int(float(...)) because some exports write frame counts as "241.0".
            typed[name] = int(float(row[name])) if kind is int else kind(row[name])
        except (TypeError, ValueError) as exn:
            raise ValueError(f"line {line}: column {name!r} has {row[name]!r}, expected {kind.__name__}") from exn
    return typed


def read_csv(path: str | Path) -> list[dict]:
    """Read `OpenVid-1M.csv` into typed row dicts keyed by the published column names."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [name for name in COLUMNS if name not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} lacks columns {missing}; got {reader.fieldnames}, expected {list(COLUMNS)}")
        return [_typed_row(row, line) for line, row in enumerate(reader, start=2)]


def top_threshold(values: np.ndarray, fraction: float) -> float:
    """The score at or above which a value is in the top `fraction` of `values`."""
    return float(np.quantile(values, 1.0 - fraction))


def v1_thresholds(rows: list[dict], top_both: float, top_either: float) -> dict:
    """Per score column, the thresholds of the "both in top" and "either in top" tests of the v1 selection."""
    thresholds = {}
    for name in ("motion score", "aesthetic score"):
        values = np.asarray([row[name] for row in rows], dtype=np.float64)
        thresholds[name] = {
            "top_both": top_threshold(values, top_both),
            "top_either": top_threshold(values, top_either),
        }
    return thresholds


def in_v1(row: dict, thresholds: dict) -> bool:
    """Whether a row passes v1: both scores in the top `top_both`, or either in the top `top_either`."""
    both = all(row[name] >= t["top_both"] for name, t in thresholds.items())
    either = any(row[name] >= t["top_either"] for name, t in thresholds.items())
    return both or either


def select_rows(
    rows: list[dict], selection: str, top_both: float, top_either: float, min_frames: int, min_seconds: float
) -> tuple[list[dict], dict]:
    """Apply the score selection, then the length filters; return the kept rows (CSV order) and the filter stats."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection={selection!r} is not one of {SELECTIONS}")
    for name, value in (("top_both", top_both), ("top_either", top_either)):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{name} must be a fraction in (0, 1], got {value!r}")
    stats: dict = {"csv_rows": len(rows)}
    if selection == "v1" and rows:
        stats["thresholds"] = v1_thresholds(rows, top_both, top_either)
        rows = [row for row in rows if in_v1(row, stats["thresholds"])]
    stats["after_selection"] = len(rows)
    rows = [row for row in rows if row["frame"] >= min_frames]
    stats["after_min_frames"] = len(rows)
    rows = [row for row in rows if row["seconds"] >= min_seconds]
    stats["after_min_seconds"] = len(rows)
    return rows, stats


def clip_sources(rows: list[dict], video_dir: str | Path) -> list[ClipSource]:
    """One `ClipSource` per row; the typed CSV row goes under `csv`, apart from the stored clip's own fps and size."""
    return [
        ClipSource(
            key=sample_key(Path(row["video"]).stem),
            path=str(Path(video_dir) / row["video"]),
            caption=row["caption"],
            meta={"source": "openvid-1m", "csv": row},
        )
        for row in rows
    ]


def build_openvid(
    csv_path: str | Path,
    videos: str | Path,
    out: str | Path,
    selection: str = "v1",
    top_both: float = 0.2,
    top_either: float = 0.03,
    min_frames: int = 0,
    min_seconds: float = 0.0,
    clips_per_shard: int = CLIPS_PER_SHARD,
    reencode: Reencode | None = None,
    workers: int = 0,
    progress: bool = True,
) -> dict:
    """Select OpenVid-1M rows and write them as `train-%06d.tar` shards plus `manifest.json` in `out`; return it."""
    if not Path(videos).is_dir():
        raise FileNotFoundError(f"video folder {videos} does not exist; expected the unpacked OpenVid-1M mp4 folder")
    rows, stats = select_rows(read_csv(csv_path), selection, top_both, top_either, min_frames, min_seconds)
    args = dict(
        csv=str(csv_path),
        videos=str(videos),
        selection=selection,
        top_both=top_both,
        top_either=top_either,
        min_frames=min_frames,
        min_seconds=min_seconds,
    )
    splits = {"train": ("train", clip_sources(rows, videos))}
    return build_shards(out, GENERATOR_NAME, args, splits, stats, clips_per_shard, reencode, workers, progress)


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser of `data/build_openvid.py`."""
    parser = argparse.ArgumentParser(
        description="Write OpenVid-1M clips as resumable webdataset shards "
        "(train-*.tar of mp4/txt/json, manifest.json). "
        "Missing, empty or undecodable videos are skipped and listed in the manifest; rerunning resumes."
    )
    parser.add_argument("--csv", required=True, help="path of the published OpenVid-1M.csv")
    parser.add_argument("--videos", required=True, help="folder of the unpacked mp4s named in the `video` column")
    parser.add_argument(
        "--selection",
        choices=SELECTIONS,
        default="v1",
        help="v1: the paper's motion/aesthetic subset; all: every row (default: %(default)s)",
    )
    parser.add_argument(
        "--top-both", type=float, default=0.2, help="v1: keep both scores in this top fraction (default: %(default)s)"
    )
    parser.add_argument(
        "--top-either", type=float, default=0.03, help="v1: or either in this top fraction (default: %(default)s)"
    )
    parser.add_argument("--min-frames", type=int, default=0, help="drop rows with fewer `frame` (default: %(default)s)")
    parser.add_argument(
        "--min-seconds", type=float, default=0.0, help="drop rows whose `seconds` is below this (default: %(default)s)"
    )
    add_writer_arguments(parser, default_out="data/openvid", clips_per_shard=CLIPS_PER_SHARD)
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Build OpenVid-1M shards from command-line arguments, print a summary and return the manifest."""
    opts = build_parser().parse_args(argv)
    names = ("selection", "top_both", "top_either", "min_frames", "min_seconds")
    filters = {name: getattr(opts, name) for name in names}
    return run_builder(build_openvid, opts, csv_path=opts.csv, videos=opts.videos, **filters)


if __name__ == "__main__":
    main()
