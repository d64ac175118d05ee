"""Resumable webdataset shard writing shared by the dataset builders (OpenVid-1M, MSR-VTT).

A build is a fixed, ordered list of `ClipSource`s per split. Shard k always holds sources
[k * clips_per_shard, (k + 1) * clips_per_shard), so a rerun rewrites exactly the shards that lack a
matching `<shard>.done` sidecar and can neither duplicate nor drop a clip. Clips whose file is missing,
empty or undecodable are skipped, recorded with the reason, and never stop the build.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from io import BytesIO
from pathlib import Path

import av
import webdataset as wds
from tqdm import tqdm

from tpdiff_lightning.data.shard_records import read_shard_record, write_json_atomic, write_shard_record
from tpdiff_lightning.data.synthetic import MANIFEST
from tpdiff_lightning.data.video_io import x264_options


@dataclass(frozen=True)
class ClipSource:
    """One input clip: its video file, the sample key, the caption (`txt`) and metadata for `json` (no width,
    height, fps or num_frames keys: those describe the stored mp4 and are added when it is written)."""

    key: str
    path: str
    caption: str
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Reencode:
    """Optional re-encoding: resize to an even `short_side` (aspect kept) and/or resample to `fps`; None keeps it."""

    short_side: int | None = None
    fps: int | None = None
    crf: int = 23

    def __post_init__(self) -> None:
        if self.short_side is not None and (self.short_side < 2 or self.short_side % 2):
            raise ValueError(f"short_side must be an even integer >= 2 (yuv420p), got {self.short_side!r}")
        if self.fps is not None and self.fps < 1:
            raise ValueError(f"fps must be a positive integer, got {self.fps!r}")

    @property
    def active(self) -> bool:
        """Whether clips are decoded and encoded again instead of copied byte for byte."""
        return self.short_side is not None or self.fps is not None


class SkipClip(Exception):
    """A clip that cannot be used; `reason` is "missing", "empty", "unreadable" or "undecodable"."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def sample_key(name: str) -> str:
    """Turn a video name into a webdataset key; webdataset splits keys at the first dot, so dots must go."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def output_size(height: int, width: int, short_side: int | None) -> tuple[int, int]:
    """Even (height, width) with the short side at `short_side` and the aspect ratio kept (None keeps the size)."""
    if short_side is None:
        return max(2, height - height % 2), max(2, width - width % 2)
    scale = short_side / min(height, width)
    return max(2, 2 * round(height * scale / 2)), max(2, 2 * round(width * scale / 2))


def _stream_rate(stream: av.video.stream.VideoStream) -> Fraction:
    """The frame rate of a decoded stream, or ValueError when the container does not say."""
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        raise ValueError("the video stream has no frame rate")
    return Fraction(rate)


def reencode_mp4(data: bytes, options: Reencode) -> tuple[bytes, dict]:
    """Decode mp4 bytes and encode them again at `options`; return the mp4 and its width, height, fps, num_frames.

    Frames stream through one at a time (full-resolution sources do not fit in memory as a whole clip). Output
    frame j shows source frame floor(j * src_fps / dst_fps), so downsampling drops frames and upsampling repeats them.
    """
    buffer = BytesIO()
    with av.open(BytesIO(data), "r") as src, av.open(buffer, "w", format="mp4") as dst:
        stream = src.streams.video[0]
        src_rate = _stream_rate(stream)
        dst_rate = Fraction(options.fps) if options.fps else src_rate
        out, slot = None, 0
        for index, frame in enumerate(src.decode(stream)):
            if out is None:
                height, width = output_size(frame.height, frame.width, options.short_side)
                out = dst.add_stream("libx264", rate=dst_rate, options=x264_options(options.crf))
                out.height, out.width, out.pix_fmt = height, width, "yuv420p"
            end = math.ceil((index + 1) * dst_rate / src_rate)  # first output slot of the next source frame
            if slot >= end:
                continue
            image = frame.reformat(width=width, height=height, format="yuv420p", interpolation="AREA")
            # Output pts count slots; the source time base would round them together and break muxing.
            image.time_base = 1 / dst_rate
            for slot in range(slot, end):
                image.pts = slot
                dst.mux(out.encode(image))
            slot = end
        if out is None:
            raise ValueError(f"mp4 of {len(data)} bytes holds no decodable video frames")
        dst.mux(out.encode())
    stored = {"width": width, "height": height, "fps": float(dst_rate), "num_frames": slot}
    return buffer.getvalue(), stored


def probe_mp4(data: bytes) -> dict:
    """Check that mp4 bytes decode to a frame; return their width, height, fps and num_frames (0 if unknown)."""
    with av.open(BytesIO(data), "r") as container:
        stream = container.streams.video[0]
        frame = next(container.decode(stream), None)
        if frame is None:
            raise ValueError(f"mp4 of {len(data)} bytes holds no decodable video frames")
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else None
        return {"width": frame.width, "height": frame.height, "fps": fps, "num_frames": stream.frames}


def load_sample(source: ClipSource, options: Reencode) -> dict:
    """Read, check and maybe re-encode one clip into a `{"__key__", "mp4", "txt", "json"}` sample, or raise SkipClip."""
    path = Path(source.path)
    if not path.is_file():
        raise SkipClip("missing")
    try:
        data = path.read_bytes()
    except OSError as exn:
        raise SkipClip("unreadable", f"{type(exn).__name__}: {exn}") from exn
    if not data:
        raise SkipClip("empty")
    try:
        mp4, stored = reencode_mp4(data, options) if options.active else (data, probe_mp4(data))
    except Exception as exn:  # FFmpeg fails in many ways on a broken file; each must cost only that clip
        raise SkipClip("undecodable", f"{type(exn).__name__}: {exn}") from exn
    # The stored clip's own width, height, fps and num_frames go at the top level, where VideoDataModule reads `fps`.
    return {"__key__": source.key, "mp4": mp4, "txt": source.caption, "json": {**source.meta, **stored}}


def shard_fingerprint(sources: list[ClipSource], options: Reencode) -> str:
    """Hash of everything that determines a shard's bytes, so a `.done` from a different plan is not trusted."""
    plan = {"sources": [asdict(source) for source in sources], "reencode": asdict(options)}
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def read_done(shard: Path, fingerprint: str) -> dict | None:
    """The `.done` record of a finished shard written from the same plan, or None when it must be (re)written."""
    record = read_shard_record(shard)
    if record is None or not shard.is_file():
        return None
    # A size mismatch means the tar was replaced or truncated after its sidecar was written.
    if record.get("fingerprint") != fingerprint or record.get("bytes") != shard.stat().st_size:
        return None
    return record


def write_shard(shard: Path, sources: list[ClipSource], options: Reencode, fingerprint: str) -> dict:
    """Write the usable clips of `sources` to the tar `shard`, then its `.done` sidecar; return the sidecar record."""
    skipped, num_clips = [], 0
    tmp = shard.with_name(shard.name + ".tmp")
    # mtime=0 makes the tar bytes depend only on the clips, so a rewritten shard is identical to the first one.
    with wds.TarWriter(str(tmp), mtime=0) as sink:
        for source in sources:
            try:
                sink.write(load_sample(source, options))
                num_clips += 1
            except SkipClip as skip:
                skipped.append({"file": Path(source.path).name, "reason": skip.reason, "detail": skip.detail})
    tmp.replace(shard)
    record = {"fingerprint": fingerprint, "num_clips": num_clips, "bytes": shard.stat().st_size, "skipped": skipped}
    write_shard_record(shard, record)
    return record


def _remove_stale_shards(out_dir: Path, prefix: str, num_shards: int) -> None:
    """Delete shards (and sidecars) of `prefix` numbered `num_shards` or above, left by a larger earlier build."""
    for path in out_dir.glob(f"{prefix}-*.tar*"):
        match = re.fullmatch(rf"{re.escape(prefix)}-(\d{{6}})\.tar(\.done|\.tmp)?", path.name)
        if match and int(match.group(1)) >= num_shards:
            path.unlink()


def _run_shards(jobs: list[tuple], workers: int, bar: tqdm) -> dict[int, dict]:
    """Run `write_shard` on (index, shard, sources, options, fingerprint) jobs, in a process pool when workers > 0."""
    records = {}
    if workers == 0:
        for index, *args in jobs:
            records[index] = write_shard(*args)
            bar.update(len(args[1]))
        return records
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(write_shard, *args): (index, len(args[1])) for index, *args in jobs}
        for future in as_completed(futures):
            index, count = futures[future]
            records[index] = future.result()
            bar.update(count)
    return records


def write_split(
    out_dir: Path,
    prefix: str,
    sources: list[ClipSource],
    clips_per_shard: int,
    options: Reencode,
    workers: int,
    bar: tqdm,
) -> dict:
    """Write `sources` as `{prefix}-%06d.tar` shards, reusing finished ones; return the split's summary."""
    chunks = [sources[i : i + clips_per_shard] for i in range(0, len(sources), clips_per_shard)]
    _remove_stale_shards(out_dir, prefix, len(chunks))
    records, jobs = {}, []
    for index, chunk in enumerate(chunks):
        shard, fingerprint = out_dir / f"{prefix}-{index:06d}.tar", shard_fingerprint(chunk, options)
        record = read_done(shard, fingerprint)
        if record is None:
            jobs.append((index, shard, chunk, options, fingerprint))
        else:
            records[index] = record
            bar.update(len(chunk))
    records.update(_run_shards(jobs, workers, bar))
    ordered = [records[index] for index in range(len(chunks))]
    return {
        # Shards whose every clip was skipped hold no samples, and an empty tar only confuses readers.
        "shards": [f"{prefix}-{i:06d}.tar" for i, record in enumerate(ordered) if record["num_clips"]],
        "num_clips": sum(record["num_clips"] for record in ordered),
        "shard_clips": [record["num_clips"] for record in ordered if record["num_clips"]],
        "bytes": sum(record["bytes"] for record in ordered if record["num_clips"]),
        "skipped": [skip for record in ordered for skip in record["skipped"]],
        "shards_written": len(jobs),
        "shards_reused": len(chunks) - len(jobs),
    }


def build_shards(
    out_dir: str | Path,
    generator: str,
    args: dict,
    splits: dict[str, tuple[str, list[ClipSource]]],
    filter_stats: dict,
    clips_per_shard: int = 1000,
    reencode: Reencode | None = None,
    workers: int = 0,
    progress: bool = True,
) -> dict:
    """Write every split (manifest name -> (shard prefix, sources)) and then `manifest.json`; return the manifest.

    The manifest has the synthetic layout (`generator`, `args`, `splits.<name>.{shards, num_clips, shard_clips}`)
    plus `bytes`, `skipped` ([{"file", "reason", "detail"}]), `filter_stats`, and `build` (shards written and
    reused by this run).
    `reencode=None` copies clips byte for byte.
    """
    if clips_per_shard < 1 or workers < 0:
        raise ValueError(f"need clips_per_shard >= 1 and workers >= 0, got {clips_per_shard} and {workers}")
    reencode = reencode or Reencode()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Drop the manifest first so an interrupted build is never mistaken for a finished one.
    (out_dir / MANIFEST).unlink(missing_ok=True)
    total = sum(len(sources) for _, sources in splits.values())
    with tqdm(total=total, desc=generator.rsplit(".", 1)[-1], unit="clip", disable=not progress) as bar:
        results = {
            name: write_split(out_dir, prefix, sources, clips_per_shard, reencode, workers, bar)
            for name, (prefix, sources) in splits.items()
        }
    manifest = {
        "generator": generator,
        "args": {**args, "clips_per_shard": clips_per_shard, "reencode": asdict(reencode)},
        "splits": {name: {key: r[key] for key in ("shards", "num_clips", "shard_clips", "bytes")}
                   for name, r in results.items()},
        "bytes": sum(r["bytes"] for r in results.values()),
        "skipped": [skip for r in results.values() for skip in r["skipped"]],
        "filter_stats": filter_stats,
    }
    write_json_atomic(out_dir / MANIFEST, manifest)
    # Written after the manifest is on disk and kept out of it, so a resumed build's manifest equals a fresh one.
    manifest["build"] = {name: {k: r[k] for k in ("shards_written", "shards_reused")} for name, r in results.items()}
    return manifest


def print_summary(manifest: dict, out_dir: str | Path, elapsed: float) -> None:
    """Print clips, shards, bytes and skip reasons of a finished build."""
    for name, split in manifest["splits"].items():
        build = manifest.get("build", {}).get(name, {})
        print(
            f"{name}: {split['num_clips']} clips in {len(split['shards'])} shards, {split['bytes'] / 2**20:.1f} MiB "
            f"({build.get('shards_written', '?')} shards written, {build.get('shards_reused', '?')} reused)"
        )
    reasons: dict[str, int] = {}
    for skip in manifest["skipped"]:
        reasons[skip["reason"]] = reasons.get(skip["reason"], 0) + 1
    print(f"skipped {len(manifest['skipped'])} clips" + "".join(f", {n} {r}" for r, n in sorted(reasons.items())))
    print(f"wrote {Path(out_dir) / MANIFEST} in {elapsed:.1f} s")


def add_writer_arguments(parser: argparse.ArgumentParser, default_out: str, clips_per_shard: int) -> None:
    """Add the output, sharding, re-encoding and worker options that every builder shares."""
    parser.add_argument("--out", default=default_out, help="folder for shards and manifest.json (default: %(default)s)")
    parser.add_argument(
        "--clips-per-shard", type=int, default=clips_per_shard, help="input clips per tar (default: %(default)s)"
    )
    parser.add_argument(
        "--short-side", type=int, default=None, help="re-encode to this even short side, aspect kept (default: keep)"
    )
    parser.add_argument("--fps", type=int, default=None, help="re-encode to this frame rate (default: keep)")
    parser.add_argument("--crf", type=int, default=23, help="x264 quality when re-encoding (default: %(default)s)")
    parser.add_argument(
        "--workers", type=int, default=0, help="shard-writing processes; 0 writes in-process (default: %(default)s)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def writer_kwargs(opts: argparse.Namespace) -> dict:
    """The `build_shards` keyword arguments selected by the options of `add_writer_arguments`."""
    return dict(
        clips_per_shard=opts.clips_per_shard,
        reencode=Reencode(short_side=opts.short_side, fps=opts.fps, crf=opts.crf),
        workers=opts.workers,
        progress=not opts.no_progress,
    )


def run_builder(build, opts: argparse.Namespace, **kwargs) -> dict:
    """Call a builder with `kwargs` plus the shared writer options, print the summary and return the manifest."""
    start = time.perf_counter()
    manifest = build(out=opts.out, **kwargs, **writer_kwargs(opts))
    print_summary(manifest, opts.out, time.perf_counter() - start)
    return manifest
