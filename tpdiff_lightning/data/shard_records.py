"""Each shard's record beside it (``<shard>.done``: its number of clips and bytes), so a reader knows how many clips a
shard holds without the manifest: a shard read through a pattern that ends early still counts every clip it lost."""

from __future__ import annotations

import json
from pathlib import Path

DONE_SUFFIX = ".done"


def record_path(shard: str | Path) -> Path:
    shard = Path(shard)
    return shard.with_name(shard.name + DONE_SUFFIX)


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write `obj` as JSON through a temporary file and a rename, so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def write_shard_record(shard: str | Path, record: dict) -> None:
    """Write ``record`` (at least ``num_clips``; the builders add ``bytes`` and more) beside ``shard``."""
    write_json_atomic(record_path(shard), record)


def read_shard_record(shard: str | Path) -> dict | None:
    """The record beside a local shard, or None (no record, unreadable, or a URL)."""
    path = record_path(shard)
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def recorded_clip_count(shard: str | Path) -> int | None:
    """The number of clips the record beside ``shard`` lists, or None."""
    record = read_shard_record(shard)
    count = (record or {}).get("num_clips")
    return count if isinstance(count, int) and count >= 0 else None


def write_split_records(out_dir: Path, shards: list[str], shard_clips: list[int]) -> None:
    """A record (clips and bytes) beside each shard of a split that was written in one go."""
    for name, clips in zip(shards, shard_clips):
        shard = Path(out_dir) / name
        write_shard_record(shard, {"num_clips": clips, "bytes": shard.stat().st_size})


def remove_shard(shard: Path) -> None:
    """Delete a shard and its record."""
    shard.unlink(missing_ok=True)
    record_path(shard).unlink(missing_ok=True)
