"""Decoding raw samples into clips: the frame step, the random start, resizing to cover the frame size and the
centre crop; samples that cannot be used are counted, never raised, unless no clip at all is long enough."""

from __future__ import annotations

import json
import random
from collections import Counter
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tpdiff_lightning.data.buckets import Bucket, nearest_bucket
from tpdiff_lightning.data.frame_size import frame_size
from tpdiff_lightning.data.latent_cache import LATENT_FORMAT, LatentBucketError, decode_latent
from tpdiff_lightning.data.lost_clips import SkipCounter
from tpdiff_lightning.data.shard_formats import check_format
from tpdiff_lightning.data.shuffling import worker_seed
from tpdiff_lightning.data.video_io import ClipLengthError, decode_mp4, mp4_fps, mp4_shape


class NoUsableClipsError(ValueError):
    """Raised by a clip stream whose samples are all too short for the clip length asked for."""


def frames_to_tensor(frames: np.ndarray, resolution: int | Sequence[int]) -> torch.Tensor:
    """Map uint8 frames (F, H, W, 3) to float32 (3, F, h, w) in [-1, 1], where ``(h, w) = frame_size(resolution)``:
    resized (keeping the aspect ratio) to cover h × w, then centre-cropped."""
    out_h, out_w = frame_size(resolution)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # (F, 3, H, W)
    height, width = x.shape[-2:]
    if (height, width) != (out_h, out_w):
        scale = max(out_h / height, out_w / width)
        size = (max(out_h, round(height * scale)), max(out_w, round(width * scale)))
        if size != (height, width):
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)  # (F, 3, H', W')
    top = (x.shape[-2] - out_h) // 2
    left = (x.shape[-1] - out_w) // 2
    x = x[..., top : top + out_h, left : left + out_w]  # (F, 3, h, w)
    return (x / 127.5 - 1.0).clamp(-1.0, 1.0).permute(1, 0, 2, 3).contiguous()  # (3, F, h, w)


def fps_step(source_fps: float, target_fps: float) -> int:
    """Frame step that brings `source_fps` nearest to `target_fps` (at least 1)."""
    return max(1, round(source_fps / target_fps))


def stride_for_fps(sample: dict, target_fps: float) -> int:
    """Frame step that brings a clip's own frame rate (its json `fps`, else the mp4's) nearest to `target_fps`."""
    meta = json.loads(sample["json"]) if "json" in sample else {}
    source_fps = float(meta.get("fps") or mp4_fps(sample["mp4"]))
    return fps_step(source_fps, target_fps)


def decode_clip(
    sample: dict, num_frames: int, frame_stride: int, resolution: int | Sequence[int], rng: random.Random | None,
    target_fps: float | None = None,
) -> dict:
    """Decode one raw webdataset sample into `{"video": (3, F, r, r), "caption": str}`; start at 0 when rng is None.

    With `target_fps`, the frame step comes from the clip's own frame rate instead of `frame_stride`.
    """
    if target_fps is not None:
        frame_stride = stride_for_fps(sample, target_fps)
    span = (num_frames - 1) * frame_stride + 1

    def choose(frames: int) -> range:  # the clip's frame indices, from the number of decoded frames
        if frames < span:
            raise ClipLengthError(f"clip has {frames} frames, needs {span} (num_frames={num_frames}, "
                                  f"stride={frame_stride})", frames=frames, num_frames=num_frames, step=frame_stride)
        start = 0 if rng is None else rng.randint(0, frames - span)
        return range(start, start + span, frame_stride)

    clip = decode_mp4(sample["mp4"], max_frames=None if rng is not None else span, keep=choose)  # (F, H, W, 3)
    return {"video": frames_to_tensor(clip, resolution), "caption": sample["txt"].decode("utf-8")}


def clip_shape(sample: dict) -> tuple[int, int, int]:
    """``(frames, height, width)`` of a raw sample: its json's ``num_frames`` (or ``frames``), ``height`` and
    ``width`` where the builder wrote them, else the mp4's header (no frame decoded)."""
    meta = json.loads(sample["json"]) if "json" in sample else {}
    frames = meta.get("num_frames") or meta.get("frames")
    if frames and meta.get("height") and meta.get("width"):
        return int(frames), int(meta["height"]), int(meta["width"])
    return mp4_shape(sample["mp4"])


def decode_bucketed_clip(sample: dict, buckets: Sequence[Bucket], frame_stride: int, rng: random.Random | None,
                         target_fps: float | None = None) -> dict:
    """Decode a raw sample at its bucket (``nearest_bucket`` from its shape, read before decoding): resized to
    cover the bucket's size and centre-cropped; the clip gains ``bucket``."""
    step = stride_for_fps(sample, target_fps) if target_fps is not None else frame_stride
    frames, height, width = clip_shape(sample)
    bucket = nearest_bucket(frames, height, width, buckets, step)
    if bucket is None:
        shortest = min(b.frames for b in buckets)
        raise ClipLengthError(f"clip has {frames} frames, shorter than every bucket (the shortest needs "
                              f"{(shortest - 1) * step + 1}: {shortest} frames, step {step})", frames=frames,
                              num_frames=shortest, step=step)
    clip = decode_clip(sample, bucket.frames, step, (bucket.height, bucket.width), rng)
    clip["bucket"] = bucket
    return clip


def _describe_counts(counts: Counter, unit: str) -> str:
    """Summarise how often each value occurred, e.g. "16 frames (1000 samples)", at most a few values in full."""
    values = sorted(counts)
    if len(values) > 5:
        return f"{values[0]} to {values[-1]} {unit} ({len(values)} different lengths in {sum(counts.values())} samples)"
    return ", ".join(f"{value} {unit} ({counts[value]} samples)" for value in values)


class ShortClipTally:
    """What a stream's too-short samples had and needed, kept as numbers (the errors would hold decoded frames)."""

    def __init__(self) -> None:
        self.lengths: Counter = Counter()  # frames a skipped sample had -> samples
        self.needs: set[tuple[int, int, int, str, bool]] = set()  # (span, num_frames, step, unit, exact)
        self.shards: set[str] = set()

    def add(self, exn: ClipLengthError, shard: str | None) -> None:
        self.lengths[exn.frames] += 1
        self.needs.add((exn.span, exn.num_frames, exn.step, exn.unit, exn.exact))
        self.shards.add(str(shard))

    def __len__(self) -> int:
        return sum(self.lengths.values())

    def error(self) -> NoUsableClipsError:
        """The error of a stream that skipped these samples as too short and found no usable clip."""
        needs = sorted(self.needs)
        unit = needs[0][3]
        needed = " or ".join(
            f"exactly num_frames={num_frames} {unit}" if exact
            else f"a span of {span} {unit} (num_frames={num_frames} x frame step {step})"
            for span, num_frames, step, unit, exact in needs[:3]
        )
        if all(exact for *_, exact in needs):  # latents of a compressing codec: the length must match exactly
            return NoUsableClipsError(
                f"no latent clip has the length asked for: the first {len(self)} samples (from {len(self.shards)} "
                f"shard{'s' if len(self.shards) != 1 else ''}) were all encoded from "
                f"{_describe_counts(self.lengths, unit)}, but this run needs {needed}. Re-encode the shards with "
                "`python data/encode_latents.py` at this num_frames, or set num_frames to the encoded length"
            )
        return NoUsableClipsError(
            f"no clip is long enough: the first {len(self)} samples (from {len(self.shards)} "
            f"shard{'s' if len(self.shards) != 1 else ''}) were all skipped as too short and none was usable. "
            f"A clip needs {needed}, but the samples seen have {_describe_counts(self.lengths, unit)}. "
            "Lower num_frames, frame_stride or raise target_fps, or use longer clips "
            "(for synthetic data, rebuild it with more --num-frames)"
        )


class DecodeClips:
    """Pipeline stage that decodes raw samples into clips and counts (never raises on) the ones it cannot use.
    With ``buckets``, each clip is decoded at its bucket's shape (``decode_bucketed_clip``); a latent clip keeps
    the bucket it was encoded at.

    The one exception: given `max_short`, once that many samples from at least `min_short_shards` shards were
    skipped as too short before any usable clip, it raises NoUsableClipsError, since then no clip is long enough
    and an endless (resampled) stream would never yield.
    """

    def __init__(
        self,
        counter: SkipCounter,
        num_frames: int,
        frame_stride: int,
        resolution: int | Sequence[int],
        random_start: bool,
        seed: int = 0,
        rank: int = 0,
        resume_step: int = 0,
        target_fps: float | None = None,
        sample_format: str = "video",
        max_short: int | None = None,
        min_short_shards: int = 1,
        buckets: Sequence[Bucket] | None = None,
    ) -> None:
        self.counter = counter
        self.max_short, self.min_short_shards = max_short, min_short_shards
        self.yielded = False
        self.short = ShortClipTally()
        self.clip_args = (num_frames, frame_stride, resolution)
        self.target_fps = target_fps
        self.sample_format = check_format(sample_format)
        self.random_start = random_start
        self.buckets = list(buckets) if buckets else None
        self.seed_args = (seed, rank, resume_step)
        self.passes = 0

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        self.passes += 1
        rng = random.Random(worker_seed(*self.seed_args, salt=2 * self.passes)) if self.random_start else None
        for sample in src:
            try:
                if self.sample_format == LATENT_FORMAT:
                    clip = decode_latent(sample, self.clip_args[0], rng=rng, buckets=self.buckets)
                elif self.buckets:
                    clip = decode_bucketed_clip(sample, self.buckets, self.clip_args[1], rng, self.target_fps)
                else:
                    clip = decode_clip(sample, *self.clip_args, rng=rng, target_fps=self.target_fps)
            except LatentBucketError:  # the cache does not fit the config: every sample would be skipped
                raise
            except Exception as exn:  # a bad sample must cost only itself, whatever the decoder raised
                self.counter.skip(f"sample {sample.get('__key__')!r} of {sample.get('__url__')}", exn,
                                  f"{sample.get('__url__')}:{sample.get('__key__')}")
                if self.max_short is not None and isinstance(exn, ClipLengthError) and not self.yielded:
                    self.short.add(exn, sample.get("__url__"))
                    if len(self.short) >= self.max_short and len(self.short.shards) >= self.min_short_shards:
                        raise self.short.error() from None
                continue
            self.yielded = True
            clip["key"] = f"{sample.get('__url__')}:{sample.get('__key__')}"  # names the sample in errors
            yield clip
