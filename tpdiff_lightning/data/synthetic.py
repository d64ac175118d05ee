"""Deterministic captioned clips of one big shape sliding over a dark background, written as webdataset shards.

Every clip shows a single solid shape (about 45% of the frame side) of one palette colour that moves
at a constant speed in one direction and wraps around the frame edges, so motion never stops. Its path starts
anywhere the whole path stays in frame (``paths="anywhere"``, the default) or runs through the frame's centre,
within 2 px (``paths="centred"``), where the direction word alone fixes the shape's place in every frame. The
caption names all four factors, e.g. "a red circle moving left fast". Each clip is drawn from its own
generator seeded by (seed, split, index), so any clip can be rebuilt alone and train and eval never
share a seed.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import re
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from tpdiff_lightning.data.shard_records import remove_shard, write_split_records
from tpdiff_lightning.data.video_io import encode_mp4

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 100, 240),
    "yellow": (235, 215, 40),
}
SHAPES = ("square", "circle")
DIRECTIONS: dict[str, tuple[float, float]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
# Pixels per frame as a fraction of the frame side: 0.6 and 1.2 px/frame at 32x32. Fast is as fast as a
# 16-frame clip allows while the whole path stays inside the frame, so the shape is never cut by a
# border; large steps make the direction of motion a large part of the training signal.
SPEEDS: dict[str, float] = {"slow": 0.6 / 32, "fast": 1.2 / 32}
BACKGROUND = (16, 16, 24)
SHAPE_FRACTION = 0.35
SPLIT_IDS = {"train": 0, "eval": 1}
PATHS = ("anywhere", "centred")
CENTRED_JITTER = 2.0  # px: how far a centred path's midpoint may sit from the frame's centre, on each axis
MANIFEST = "manifest.json"
GENERATOR_NAME = "tpdiff_lightning.data.synthetic"
SYNTHETIC_FPS = 8  # frame rate stored in the mp4s, from which `target_fps` derives the frame step


def caption_for(colour: str, shape: str, direction: str, speed: str) -> str:
    """Return the caption that names a clip's colour, shape, direction and speed."""
    return f"a {colour} {shape} moving {direction} {speed}"


def _wrapped_offset(coords: np.ndarray, centre: np.ndarray, size: int) -> np.ndarray:
    """Signed distance from `centre` (F,) to `coords` (N,) on a circle of length `size`, as (F, N)."""
    return (coords[None, :] - centre[:, None] + size / 2) % size - size / 2


def _coverage(dx: np.ndarray, dy: np.ndarray, shape: str, radius: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape of half-side `radius` at offsets dx (F, 1, W), dy (F, H, 1)."""
    if shape == "square":
        distance = np.maximum(np.abs(dx), np.abs(dy))
    elif shape == "circle":
        distance = np.sqrt(dx**2 + dy**2)
    else:
        raise ValueError(f"shape={shape!r} is not one of {SHAPES}")
    # A one-pixel linear ramp at the edge keeps sub-pixel motion smooth, which H.264 preserves well.
    return np.clip(radius - distance + 0.5, 0.0, 1.0)


def render_clip(
    colour: str, shape: str, direction: str, speed: str, start: tuple[float, float], num_frames: int, size: int
) -> np.ndarray:
    """Render one clip as uint8 frames (F, H, W, 3) with the shape centred at `start` (x, y) in frame 0."""
    step = SPEEDS[speed] * size
    vx, vy = DIRECTIONS[direction]
    t = np.arange(num_frames, dtype=np.float64)
    pixel = np.arange(size, dtype=np.float64) + 0.5
    dx = _wrapped_offset(pixel, start[0] + vx * step * t, size)[:, None, :]  # (F, 1, W)
    dy = _wrapped_offset(pixel, start[1] + vy * step * t, size)[:, :, None]  # (F, H, 1)
    alpha = _coverage(dx, dy, shape, SHAPE_FRACTION * size / 2)[..., None]  # (F, H, W, 1)
    background = np.asarray(BACKGROUND, dtype=np.float64)
    frames = background + alpha * (np.asarray(PALETTE[colour], dtype=np.float64) - background)
    return np.round(frames).astype(np.uint8)


def start_position(rng: np.random.Generator, direction: str, speed: str, num_frames: int, size: int,
                   paths: str = "anywhere") -> tuple[float, float]:
    """The start (x, y) of a clip's path. ``"anywhere"``: random, such that the whole shape stays in frame for the
    clip (it wraps only where it cannot). ``"centred"``: the path's midpoint is the frame's centre within
    ``CENTRED_JITTER`` px on each axis, so the direction fixes where the shape is in every frame; a fast path's
    first or last frames may then reach up to that far past the edge, where the shape wraps round."""
    if paths not in PATHS:
        raise ValueError(f"paths={paths!r} is invalid; expected one of {list(PATHS)}")
    half = SHAPE_FRACTION * size / 2 + 1.0  # plus the anti-aliased edge
    travel = SPEEDS[speed] * size * (num_frames - 1)
    start = []
    for v in DIRECTIONS[direction]:
        if paths == "centred":
            start.append(float(size / 2 - v * travel / 2 + rng.uniform(-CENTRED_JITTER, CENTRED_JITTER)))
            continue
        low, high = half + (travel if v < 0 else 0.0), size - half - (travel if v > 0 else 0.0)
        start.append(float(rng.uniform(low, high)) if low <= high else float(rng.uniform(0, size)))
    return start[0], start[1]


def make_clip(rng: np.random.Generator, num_frames: int, size: int, height: int | None = None,
              width: int | None = None, paths: str = "anywhere") -> tuple[np.ndarray, str, dict]:
    """Draw one random clip: uint8 frames (F, H, W, 3) with H = W = size, its caption, and its metadata. With
    ``height`` and ``width`` (a portrait or landscape clip) it is drawn square at the larger side and centre-cropped
    to ``height x width``. ``paths``: where its path lies (`start_position`)."""
    if num_frames < 1 or size < 4:
        raise ValueError(f"need num_frames >= 1 and size >= 4, got num_frames={num_frames}, size={size}")
    if height is not None or width is not None:
        height, width = height or size, width or size
        frames, caption, meta = make_clip(rng, num_frames, max(height, width), paths=paths)
        top, left = (frames.shape[1] - height) // 2, (frames.shape[2] - width) // 2
        meta.update(height=height, width=width)
        return np.ascontiguousarray(frames[:, top:top + height, left:left + width]), caption, meta
    colour = str(rng.choice(list(PALETTE)))
    shape = str(rng.choice(SHAPES))
    direction = str(rng.choice(list(DIRECTIONS)))
    speed = str(rng.choice(list(SPEEDS)))
    start = start_position(rng, direction, speed, num_frames, size, paths)
    frames = render_clip(colour, shape, direction, speed, start, num_frames, size)
    meta = {
        "colour": colour,
        "shape": shape,
        "direction": direction,
        "speed": speed,
        "speed_px_per_frame": SPEEDS[speed] * size,
        "start_xy": list(start),
        "num_frames": num_frames,
        "size": size,
        "height": size,
        "width": size,
    }
    return frames, caption_for(colour, shape, direction, speed), meta


def content_fingerprint() -> str:
    """A short hash of everything that decides what a clip shows: the palette, shapes, directions, speeds, sizes and
    the source of the functions that draw and caption a clip. A build whose manifest records another fingerprint
    was made by another version of this generator (or an edited one), so its clips are not the ones these
    arguments would give, and it is rebuilt."""
    constants = repr((PALETTE, SHAPES, DIRECTIONS, SPEEDS, BACKGROUND, SHAPE_FRACTION))
    sources = "".join(inspect.getsource(f) for f in (caption_for, _wrapped_offset, _coverage, render_clip,
                                                       start_position, make_clip))
    return hashlib.sha256((constants + sources).encode()).hexdigest()[:16]


def clip_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Return the generator of clip `index` of `split`; splits get disjoint seed sequences."""
    return np.random.default_rng([seed, SPLIT_IDS[split], index])


def _remove_old_shards(out_dir: Path, split: str) -> None:
    """Delete `split` shards of an earlier build, so a smaller rebuild leaves no stale shards behind."""
    for path in out_dir.glob(f"{split}-*.tar"):
        if re.fullmatch(rf"{split}-\d{{6}}\.tar", path.name):
            remove_shard(path)


def _write_split(out_dir: Path, split: str, num_clips: int, args: dict, bar: tqdm) -> list[str]:
    """Write `num_clips` clips of `split` as `{split}-%06d.tar` shards in `out_dir` and return the shard names."""
    _remove_old_shards(out_dir, split)
    pattern = str(out_dir / f"{split}-%06d.tar")
    paths, shapes = args.get("paths", "anywhere"), args.get("shapes")  # builds record paths only if not default
    # mtime=0 makes the tar bytes depend only on the clips, so rebuilding gives identical shards.
    with wds.ShardWriter(pattern, maxcount=args["clips_per_shard"], verbose=0, mtime=0) as sink:
        for index in range(num_clips):
            if shapes:  # mixed shapes: clip i takes shape i mod len(shapes)
                frames_i, height, width = shapes[index % len(shapes)]
                frames, caption, meta = make_clip(clip_rng(args["seed"], split, index), frames_i, args["size"],
                                                  height, width, paths=paths)
            else:
                frames, caption, meta = make_clip(clip_rng(args["seed"], split, index), args["num_frames"],
                                                  args["size"], paths=paths)
            key = f"{split}-{index:06d}"
            sink.write({"__key__": key, "mp4": encode_mp4(frames, fps=args["fps"]), "txt": caption, "json": meta})
            bar.update(1)
    num_shards = -(-num_clips // args["clips_per_shard"])
    shards = [f"{split}-{shard:06d}.tar" for shard in range(num_shards)]
    write_split_records(out_dir, shards, _shard_clips(num_clips, args["clips_per_shard"]))
    return shards


def _shard_clips(num_clips: int, clips_per_shard: int) -> list[int]:
    """Samples in each shard of a split: full shards, then the remainder."""
    return [min(clips_per_shard, num_clips - start) for start in range(0, num_clips, clips_per_shard)]


def _generator_args(num_train, num_eval, num_frames, size, seed, clips_per_shard, fps, shapes=None,
                    paths="anywhere") -> dict:
    """Collect and check the arguments that fully determine a synthetic build."""
    args = dict(
        num_train=num_train,
        num_eval=num_eval,
        num_frames=num_frames,
        size=size,
        seed=seed,
        clips_per_shard=clips_per_shard,
        fps=fps,
    )
    if paths not in PATHS:  # checked before anything is written (start_position checks again for direct callers)
        raise ValueError(f"paths={paths!r} is invalid; expected one of {list(PATHS)}")
    if paths != "anywhere":  # recorded only where it differs, so default builds keep their arguments
        args["paths"] = paths
    if shapes:
        args["shapes"] = [list(s) for s in shapes]
        for s in args["shapes"]:
            if not (len(s) == 3 and all(isinstance(v, int) and v >= 1 for v in s) and s[1] % 2 == 0
                    and s[2] % 2 == 0 and min(s[1:]) >= 4):
                raise ValueError(f"shapes entry {s!r} is invalid; expected [frames, height, width] with even "
                                 "sides >= 4 (H.264 yuv420p)")
    for name in ("num_train", "num_eval", "num_frames", "clips_per_shard", "fps"):
        if not isinstance(args[name], int) or args[name] < 1:
            raise ValueError(f"{name} must be a positive integer, got {args[name]!r}")
    if not isinstance(size, int) or size < 4 or size % 2:
        raise ValueError(f"size must be an even integer >= 4 (H.264 yuv420p), got {size!r}")
    return args


def write_synthetic_shards(
    out_dir: str | Path,
    num_train: int = 2048,
    num_eval: int = 128,
    num_frames: int = 16,
    size: int = 32,
    seed: int = 0,
    clips_per_shard: int = 256,
    fps: int = SYNTHETIC_FPS,
    progress: bool = True,
    shapes: list[tuple[int, int, int]] | None = None,
    paths: str = "anywhere",
) -> dict:
    """Write train and eval shards of synthetic clips (F=num_frames, H=W=size) plus `manifest.json`; return the manifest.

    ``shapes`` (``[(frames, height, width), ...]``) makes clips of mixed shapes instead, clip i of each split
    taking shape i mod len(shapes): portrait, square and landscape, of several lengths, to exercise buckets.
    ``paths``: ``"anywhere"`` or ``"centred"`` (`start_position`)."""
    args = _generator_args(num_train, num_eval, num_frames, size, seed, clips_per_shard, fps, shapes, paths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Drop the manifest first so an interrupted build is never mistaken for a finished one.
    (out_dir / MANIFEST).unlink(missing_ok=True)
    counts = {"train": num_train, "eval": num_eval}
    with tqdm(total=num_train + num_eval, desc="synthetic clips", unit="clip", disable=not progress) as bar:
        splits = {
            split: {"shards": _write_split(out_dir, split, count, args, bar), "num_clips": count,
                    "shard_clips": _shard_clips(count, args["clips_per_shard"])}
            for split, count in counts.items()
        }
    manifest = {"generator": GENERATOR_NAME, "content": content_fingerprint(), "args": args, "splits": splits}
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(out_dir / MANIFEST)
    return manifest


def read_manifest(root: str | Path) -> dict | None:
    """Return the parsed `manifest.json` in `root`, or None when there is none."""
    path = Path(root) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def synthetic_mismatch(out_dir: str | Path, **generator_args) -> str | None:
    """Return None when `out_dir` holds a finished synthetic build made with exactly these
    `write_synthetic_shards` arguments (the same defaults apply), else a one-line reason why it does not."""
    manifest = read_manifest(out_dir)
    if manifest is None:
        return f"there is no {MANIFEST}"
    if manifest.get("generator") != GENERATOR_NAME:
        return f"its {MANIFEST} was written by {manifest.get('generator')!r}, not the synthetic generator"
    params = inspect.signature(write_synthetic_shards).parameters
    defaults = {name: p.default for name, p in params.items() if name not in ("out_dir", "progress")}
    args = _generator_args(**{**defaults, **generator_args})
    recorded = manifest.get("args") or {}
    if recorded != args:
        differ = [name for name in sorted(set(args) | set(recorded)) if recorded.get(name) != args.get(name)]
        old = ", ".join(f"{name}={recorded.get(name)!r}" for name in differ)
        new = ", ".join(f"{name}={args.get(name)!r}" for name in differ)
        return f"it was built with {old}, but this build asks for {new}"
    content = content_fingerprint()
    if manifest.get("content") != content:
        return (f"its clips were drawn by another version of the generator (content {manifest.get('content')!r}, "
                f"this one draws {content!r})")
    shards = [name for split in manifest["splits"].values() for name in split["shards"]]
    missing = [name for name in shards if not (Path(out_dir) / name).is_file()]
    if missing:
        return f"{len(missing)} of its {len(shards)} shards are missing (e.g. {missing[0]})"
    return None


def synthetic_exists(out_dir: str | Path, **generator_args) -> bool:
    """Return True when `out_dir` holds a finished synthetic build made with exactly these
    `write_synthetic_shards` arguments (the same defaults apply)."""
    return synthetic_mismatch(out_dir, **generator_args) is None


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser shared by `data/make_synthetic.py` and `python -m`."""
    parser = argparse.ArgumentParser(
        description="Write captioned moving-shape clips as webdataset shards (train-*.tar, eval-*.tar, manifest.json)."
    )
    parser.add_argument("--out", default="data/synthetic", help="output folder (default: %(default)s)")
    parser.add_argument("--num-train", type=int, default=2048, help="training clips (default: %(default)s)")
    parser.add_argument("--num-eval", type=int, default=128, help="evaluation clips (default: %(default)s)")
    parser.add_argument("--num-frames", type=int, default=16, help="frames per clip (default: %(default)s)")
    parser.add_argument("--size", type=int, default=32, help="even frame side in pixels (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default: %(default)s)")
    parser.add_argument("--clips-per-shard", type=int, default=256, help="clips per tar (default: %(default)s)")
    parser.add_argument(
        "--fps", type=int, default=SYNTHETIC_FPS, help="frame rate stored in the mp4 (default: %(default)s)"
    )
    parser.add_argument("--shape", type=int, nargs=3, action="append", metavar=("FRAMES", "HEIGHT", "WIDTH"),
                        help="a clip shape; repeat for clips of mixed shapes (portrait, square, landscape, several "
                             "lengths) in turn, to train with buckets (default: num-frames x size x size)")
    parser.add_argument("--paths", choices=PATHS, default="anywhere",
                        help="where a clip's path lies: anywhere it stays in frame, or through the frame's centre "
                             "(the direction word then fixes the shape's place in every frame) (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a matching build exists")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Build the synthetic shards from command-line arguments, print a summary and return the manifest."""
    opts = build_parser().parse_args(argv)
    kwargs = dict(
        num_train=opts.num_train,
        num_eval=opts.num_eval,
        num_frames=opts.num_frames,
        size=opts.size,
        seed=opts.seed,
        clips_per_shard=opts.clips_per_shard,
        fps=opts.fps,
        shapes=[tuple(s) for s in opts.shape] if opts.shape else None,
        paths=opts.paths,
    )
    start = time.perf_counter()
    reason = synthetic_mismatch(opts.out, **kwargs)
    if not opts.force and reason is None:
        print(f"{opts.out}: a matching synthetic build exists; nothing to do (use --force to rebuild)")
        return read_manifest(opts.out)
    existing = read_manifest(opts.out)
    if existing is not None and existing.get("generator") != GENERATOR_NAME and not opts.force:
        raise SystemExit(f"{opts.out} holds a dataset written by {existing.get('generator')!r}, not synthetic data; "
                         "choose another --out (or pass --force to overwrite its shards)")
    if reason is not None and existing is not None:
        print(f"{opts.out}: rebuilding synthetic data: {reason}")
    manifest = write_synthetic_shards(opts.out, progress=not opts.no_progress, **kwargs)
    elapsed = time.perf_counter() - start
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['num_clips']} clips in {len(info['shards'])} shards")
    print(f"wrote {Path(opts.out) / MANIFEST} in {elapsed:.1f} s")
    return manifest


if __name__ == "__main__":
    main()
