"""Webdataset video pipelines and the Lightning DataModule that serves them.

Every batch of clips is a dict `{"video": (B, 3, F, H, W) float32 in [-1, 1], "caption": list[str],
"key": list[str], "num_skipped": LongTensor (), "skipped": list[str]}`, where `key` names each clip as
"<shard url>:<sample key>" and `skipped` names the clips the producing worker could not use (corrupt mp4, too few
frames, lost to a truncated tar) for the first time since its previous batch; `num_skipped` is their number.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import braceexpand
import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from torch.utils.data import DataLoader

from tpdiff_lightning.data.synthetic import (
    GENERATOR_NAME,
    SYNTHETIC_FPS,
    caption_for,
    read_manifest,
    synthetic_mismatch,
    write_synthetic_shards,
)
from tpdiff_lightning.data.latent_cache import LATENT_FORMAT, decode_latent, pad_text
from tpdiff_lightning.data.shard_records import recorded_clip_count
from tpdiff_lightning.data.video_io import ClipLengthError, decode_mp4, mp4_fps
from tpdiff_lightning.frame_size import frame_size

DEFAULT_PREDICT_PROMPTS = (
    caption_for("red", "square", "right", "fast"),
    caption_for("green", "circle", "left", "slow"),
    caption_for("blue", "square", "up", "fast"),
    caption_for("yellow", "circle", "down", "slow"),
)


SAMPLE_FORMATS = ("auto", "video", LATENT_FORMAT)

# A training stream that has skipped this many samples as too short, from at least MIN_SHORT_SHARDS shards
# (or all of them), before yielding a single clip stops with NoUsableClipsError: no clip is long enough, and the
# resampled stream would otherwise search forever. Any usable clip disarms the check for good, so short clips
# among usable ones never trigger it; the shard count keeps one shard of only short clips from triggering it.
MAX_SHORT_BEFORE_FIRST_CLIP = 1000
MIN_SHORT_SHARDS = 4

log = logging.getLogger(__name__)


def check_format(sample_format: str) -> str:
    """Return `sample_format` if known, else raise a ValueError listing the known ones."""
    if sample_format not in SAMPLE_FORMATS:
        raise ValueError(f"sample_format={sample_format!r} is unknown; expected one of {list(SAMPLE_FORMATS)}")
    return sample_format


def is_remote(url: str) -> bool:
    """True for shard names that webdataset opens itself: `pipe:` commands and `scheme://` URLs."""
    return url.startswith("pipe:") or "://" in url


class CorruptSampleWarning(UserWarning):
    """Warned once per sample that a pipeline drops instead of crashing."""


class NoUsableClipsError(ValueError):
    """Raised by a clip stream whose samples are all too short for the clip length asked for."""


class SkipCounter:
    """The clips one worker's pipeline could not use, each counted once however often a resampled stream reads
    it again; the collate reads and resets the new ones once per batch.

    A clip is named by ``<shard url>:<sample key>`` when its sample was read (a corrupt mp4, too few frames), by
    ``<shard url>#<position>`` when a shard ended before it (a truncated tar whose sample count is known), and by
    ``<shard url>#<n>+`` when a shard of unknown length ended early after ``n`` samples (at least one clip lost).
    """

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.new: list[str] = []

    def _add(self, clip_id: str) -> bool:
        if clip_id in self.seen:
            return False
        self.seen.add(clip_id)
        self.new.append(clip_id)
        return True

    def skip(self, what: str, exn: BaseException, clip_id: str | None = None) -> None:
        """Record one unusable sample (first time only) and warn with its name and the error."""
        if self._add(clip_id or f"{what}#{len(self.seen)}"):
            warnings.warn(f"skipping {what}: {type(exn).__name__}: {exn}", CorruptSampleWarning, stacklevel=2)

    def lose(self, url: str, delivered: int, expected: int | None, errors: list[BaseException], rank: int = 0,
             world_size: int = 1) -> None:
        """Record the samples a shard never delivered: it ended after ``delivered`` of ``expected`` (``None``: its
        length is unknown, so at least one). Where every rank reads the shard and keeps every ``world_size``-th
        sample, this rank counts only its own share."""
        why = f" ({type(errors[0]).__name__}: {errors[0]})" if errors else ""
        if expected is None:
            if self._add(f"{url}#{delivered}+"):
                warnings.warn(f"shard {url} ended early after {delivered} samples{why}; its length is unknown (no "
                              "manifest or .done sidecar lists it), so at least one clip is lost",
                              CorruptSampleWarning, stacklevel=2)
            return
        fresh = [self._add(f"{url}#{i}") for i in range(delivered, expected) if i % world_size == rank]
        if any(fresh):
            warnings.warn(f"shard {url} ended early after {delivered} samples; its length is {expected}: "
                          f"{expected - delivered} lost{why}", CorruptSampleWarning, stacklevel=2)

    def take(self) -> list[str]:
        """The clips first recorded since the last call."""
        new, self.new = self.new, []
        return new


class CountedShardSamples:
    """Pipeline stage that expands shard URLs into raw samples (like ``wds.tarfile_to_samples``) and checks each
    shard's sample count against its known length (``shard_clips``: from the manifest or the shards' ``.done``
    sidecars): the samples a shard cut short (a truncated tar) never delivered are counted as lost and named in a
    warning. A shard of unknown length that ends in an error counts as at least one lost clip.
    """

    def __init__(self, counter: SkipCounter, shard_clips: dict[str, int] | None = None, rank: int = 0,
                 world_size: int = 1) -> None:
        self.counter = counter
        self.shard_clips = shard_clips or {}
        self.rank, self.world_size = rank, world_size  # the eval stream's split of each shard's samples

    def __call__(self, sources: Iterable[dict]) -> Iterator[dict]:
        for source in sources:
            url = source.get("url")
            expected = self.shard_clips.get(url)
            errors: list[BaseException] = []
            delivered = 0
            for sample in wds.tarfile_to_samples(handler=lambda exn: errors.append(exn) or True)(iter([source])):
                delivered += 1
                yield sample
            if (expected is not None and delivered < expected) or (expected is None and errors):
                self.counter.lose(url, delivered, expected, errors, self.rank, self.world_size)
            elif errors:  # a damaged member that did not shorten the shard's sample count
                for exn in errors:
                    self.counter.skip(f"unreadable data in shard {url}", exn, f"{url}#{type(exn).__name__}")


def worker_seed(seed: int, rank: int, resume_step: int, salt: int) -> int:
    """Mix the seed, rank, DataLoader worker id, resume step and a per-stage salt into one 63-bit seed."""
    info = torch.utils.data.get_worker_info()
    worker = 0 if info is None else info.id
    state = np.random.SeedSequence([seed, rank, worker, resume_step, salt]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


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
    ) -> None:
        self.counter = counter
        self.max_short, self.min_short_shards = max_short, min_short_shards
        self.yielded = False
        self.short = ShortClipTally()
        self.clip_args = (num_frames, frame_stride, resolution)
        self.target_fps = target_fps
        self.sample_format = check_format(sample_format)
        self.random_start = random_start
        self.seed_args = (seed, rank, resume_step)
        self.passes = 0

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        self.passes += 1
        rng = random.Random(worker_seed(*self.seed_args, salt=2 * self.passes)) if self.random_start else None
        for sample in src:
            try:
                if self.sample_format == LATENT_FORMAT:
                    clip = decode_latent(sample, self.clip_args[0], rng=rng)
                else:
                    clip = decode_clip(sample, *self.clip_args, rng=rng, target_fps=self.target_fps)
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


class BufferShuffle:
    """Pipeline stage that shuffles through a buffer, seeded per worker and pass (webdataset seeds from time)."""

    def __init__(self, bufsize: int, seed: int, rank: int, resume_step: int) -> None:
        self.bufsize = bufsize
        self.seed_args = (seed, rank, resume_step)
        self.passes = 0

    def __call__(self, src: Iterable[Any]) -> Iterator[Any]:
        self.passes += 1
        rng = random.Random(worker_seed(*self.seed_args, salt=2 * self.passes + 1))
        buffer: list = []
        for sample in src:
            if len(buffer) < self.bufsize:
                buffer.append(sample)
                continue
            k = rng.randrange(self.bufsize)
            yield buffer[k]
            buffer[k] = sample
        rng.shuffle(buffer)
        yield from buffer


def collate_clips(samples: list[dict], counter: SkipCounter) -> dict:
    """Stack clips into `{"video": (B, 3, F, H, W), "caption": list[str], "num_skipped": LongTensor (),
    "skipped": list[str]}` (the clips the worker could not use, first seen since its previous batch).

    Latent samples give `"latent": (B, C, F, H', W')` and `"codec"` instead of `"video"`, plus padded
    `"text_emb": (B, L, D)`, `"text_mask": (B, L)` when the shards hold caption embeddings.
    """
    key = "latent" if "latent" in samples[0] else "video"
    skipped = counter.take()
    batch = {
        key: torch.stack([s[key] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "key": [s.get("key") for s in samples],
        "num_skipped": torch.tensor(len(skipped), dtype=torch.long),
        "skipped": skipped,
    }
    if key == "latent":
        codecs = {s["codec"] for s in samples}
        if len(codecs) != 1:
            raise ValueError(f"one batch mixes latent shards of {len(codecs)} codecs: {sorted(codecs)}")
        batch["codec"] = codecs.pop()
        if all("text_emb" in s for s in samples):
            encoders = {s["text_encoder"] for s in samples}
            if len(encoders) != 1:
                raise ValueError(f"one batch mixes caption embeddings of {len(encoders)} text encoders: "
                                 f"{sorted(encoders)}; re-encode the shards with one text encoder")
            batch["text_emb"], batch["text_mask"] = pad_text(samples)
            batch["text_encoder"] = encoders.pop()
    return batch


def split_samples_by_rank(src: Iterable[dict], rank: int, world_size: int) -> Iterator[dict]:
    """Keep every `world_size`-th sample of each shard starting at `rank`, so ranks can share even one shard."""
    url, position = None, 0
    for sample in src:
        if sample.get("__url__") != url:
            url, position = sample.get("__url__"), 0
        if position % world_size == rank:
            yield sample
        position += 1


def train_pipeline(
    urls: list[str],
    num_frames: int,
    resolution: int | Sequence[int],
    batch_size: int,
    frame_stride: int = 1,
    seed: int = 0,
    rank: int = 0,
    resume_step: int = 0,
    shuffle_buffer: int = 256,
    target_fps: float | None = None,
    sample_format: str = "video",
    shard_clips: dict[str, int] | None = None,
) -> wds.DataPipeline:
    """Infinite stream of full training batches: resampled shards, seeded shuffle, random clip start.

    Every (seed, rank, worker, resume_step) draws its own shard sequence, so ranks need no node splitter and
    always get the same number of batches; cut the stream into epochs with `.with_epoch(batches_per_worker)`.
    When no clip is long enough for `num_frames` (see MAX_SHORT_BEFORE_FIRST_CLIP) it raises NoUsableClipsError.
    `shard_clips` (url -> sample count, from the manifest) lets it count the samples a truncated shard lost.
    """
    counter = SkipCounter()
    seeds = dict(seed=seed, rank=rank, resume_step=resume_step)
    shard_seed = functools.partial(worker_seed, seed, rank, resume_step, 0)
    return wds.DataPipeline(
        wds.ResampledShards(urls, seed=seed, worker_seed=shard_seed, deterministic=True),
        CountedShardSamples(counter, shard_clips),
        BufferShuffle(shuffle_buffer, **seeds),
        DecodeClips(counter, num_frames, frame_stride, resolution, random_start=True, target_fps=target_fps,
                    sample_format=sample_format, max_short=MAX_SHORT_BEFORE_FIRST_CLIP,
                    min_short_shards=min(MIN_SHORT_SHARDS, len(set(urls))), **seeds),
        wds.batched(batch_size, collation_fn=functools.partial(collate_clips, counter=counter), partial=False),
    )


def eval_pipeline(
    urls: list[str],
    num_frames: int,
    resolution: int | Sequence[int],
    batch_size: int,
    frame_stride: int = 1,
    rank: int = 0,
    world_size: int = 1,
    target_fps: float | None = None,
    sample_format: str = "video",
    shard_clips: dict[str, int] | None = None,
) -> wds.DataPipeline:
    """Each clip of `urls` exactly once across ranks and workers, from its first frame, in batches (last one partial).

    Ranks take interleaved samples of every shard (all ranks read all shards, which is cheap for eval sets) and
    their batch counts can differ by one, so reduce eval metrics at epoch end rather than per step.
    `shard_clips` (url -> sample count, from the manifest) lets it count the samples a truncated shard lost.
    """
    counter = SkipCounter()
    return wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_worker,
        CountedShardSamples(counter, shard_clips, rank, world_size),
        functools.partial(split_samples_by_rank, rank=rank, world_size=world_size),
        DecodeClips(counter, num_frames, frame_stride, resolution, random_start=False, target_fps=target_fps,
                    sample_format=sample_format),
        wds.batched(batch_size, collation_fn=functools.partial(collate_clips, counter=counter), partial=True),
    )


def _check_positive(**values: int) -> None:
    """Raise ValueError naming the first argument that is not a positive integer."""
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


class VideoDataModule(L.LightningDataModule):
    """Captioned video clips from webdataset shards (`mp4` + `txt` per sample), with synthetic data built on demand.

    Args:
        root: Folder holding the shards. Without explicit patterns, its `manifest.json` lists them
            (`splits.train.shards`, `splits.eval.shards`).
        train_shards: Brace pattern of training shards, e.g. `"train-{000000..000007}.tar"`, relative to
            `root` unless absolute, or any URL webdataset opens (`"https://host/train-{000000..000099}.tar"`,
            `"pipe:aws s3 cp s3://bucket/train-{000000..000099}.tar -"`). None reads the manifest in `root`.
        eval_shards: Brace pattern of evaluation shards, like `train_shards`. None reads the manifest.
        num_frames: Frames per clip, F.
        resolution: Frame size: an int for square frames, or ``[height, width]`` (e.g. ``[480, 832]``); clips are
            resized to cover it, keeping their aspect ratio, and centre-cropped.
        batch_size: Clips per batch for training, evaluation and prompts per batch for prediction.
        num_workers: DataLoader worker processes (0 decodes in the main process).
        train_steps_per_epoch: Training batches per epoch from the infinite resampled stream (rounded up to a
            multiple of `num_workers`, since webdataset counts the epoch per worker).
        seed: Base seed of shard resampling, shuffling, clip starts and prediction seeds (>= 0).
        frame_stride: Take every `frame_stride`-th decoded frame, so a clip spans (F - 1) * stride + 1 frames.
        target_fps: Instead of `frame_stride`, step through each clip so its frame rate (the sample json's
            `fps`, else the mp4's) comes nearest to this; None keeps `frame_stride`. A synthetic build is made
            long enough for the step this gives its 8 fps clips.
        sample_format: "video" (mp4 shards), "latent" (shards from `data/encode_latents.py`; `num_frames` still
            counts video frames, and the clips are not resized), or "auto": the manifest's `format`, else video.
        shuffle_buffer: Raw samples held by the training shuffle buffer.
        build_synthetic: Where `prepare_data` may write synthetic moving-shape shards when no patterns are
            given: a folder (``configs/default.yaml``: ``data/synthetic``), built only when `root` is that folder
            and has no manifest, so a mistyped `root` stops with an error instead of training on synthetic data;
            ``true`` builds at any `root` without a manifest; ``false`` never builds. An outdated synthetic build
            in `root` is rebuilt (unless ``false``), with a warning naming the arguments that changed.
        synthetic_num_train: Training clips of the synthetic build.
        synthetic_num_eval: Evaluation clips of the synthetic build.
        predict_prompts: Captions to sample in `predict`; None uses a few synthetic captions.
        predict_seeds_per_prompt: Samples per prompt in `predict`, each with its own seed.
    """

    def __init__(
        self,
        root: str = "data/synthetic",
        train_shards: str | None = None,
        eval_shards: str | None = None,
        num_frames: int = 16,
        resolution: int | tuple[int, int] = 32,
        batch_size: int = 8,
        num_workers: int = 2,
        train_steps_per_epoch: int = 200,
        seed: int = 0,
        frame_stride: int = 1,
        target_fps: float | None = None,
        sample_format: str = "auto",
        shuffle_buffer: int = 256,
        build_synthetic: bool | str = False,
        synthetic_num_train: int = 2048,
        synthetic_num_eval: int = 128,
        predict_prompts: list[str] | None = None,
        predict_seeds_per_prompt: int = 1,
    ) -> None:
        super().__init__()
        _check_positive(
            num_frames=num_frames,
            resolution=min(frame_size(resolution)),
            batch_size=batch_size,
            train_steps_per_epoch=train_steps_per_epoch,
            frame_stride=frame_stride,
            shuffle_buffer=shuffle_buffer,
            synthetic_num_train=synthetic_num_train,
            synthetic_num_eval=synthetic_num_eval,
            predict_seeds_per_prompt=predict_seeds_per_prompt,
        )
        if num_workers < 0 or seed < 0:
            raise ValueError(f"num_workers and seed must be >= 0, got num_workers={num_workers}, seed={seed}")
        if predict_prompts is not None and not predict_prompts:
            raise ValueError("predict_prompts is an empty list; pass None for the default prompts")
        self.save_hyperparameters()
        self.root = Path(root)
        self.train_shards, self.eval_shards = train_shards, eval_shards
        if target_fps is not None and not target_fps > 0:
            raise ValueError(f"target_fps={target_fps!r} is invalid; expected a positive frame rate or None")
        self.num_frames, self.resolution, self.frame_stride = num_frames, resolution, frame_stride
        self.target_fps = target_fps
        self.sample_format = check_format(sample_format)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.train_steps_per_epoch, self.shuffle_buffer = train_steps_per_epoch, shuffle_buffer
        self.build_synthetic = build_synthetic
        self.synthetic_num_train, self.synthetic_num_eval = synthetic_num_train, synthetic_num_eval
        self.predict_prompts = list(predict_prompts or DEFAULT_PREDICT_PROMPTS)
        self.predict_seeds_per_prompt = predict_seeds_per_prompt
        self.resume_step: int | None = None

    def set_resume_step(self, step: int) -> None:
        """Reseed the training stream from `step` so a resumed run does not replay the start of the data.

        Without a call, `train_dataloader` uses the attached trainer's `global_step` (already restored from the
        checkpoint when Lightning builds the loader), so resuming through `ckpt_path` needs nothing extra.
        """
        if step < 0:
            raise ValueError(f"resume step must be >= 0, got {step}")
        self.resume_step = step

    def _synthetic_args(self) -> dict:
        """Arguments of the synthetic build that matches this module's clip length and resolution.

        With `target_fps` the clips are read at the frame step `target_fps` gives the synthetic frame rate, as
        `decode_clip` does, so they must be that much longer than with `frame_stride`.
        """
        size = max(frame_size(self.resolution))  # square clips, centre-cropped to the frame size
        if size < 4 or size % 2:
            raise ValueError(f"resolution={self.resolution!r} cannot be built as synthetic data: expected an even "
                             f"frame side >= 4 (H.264 stores yuv420p frames of even size), got {size}; "
                             f"use e.g. {max(4, size + size % 2)}")
        step = self.frame_stride if self.target_fps is None else fps_step(SYNTHETIC_FPS, self.target_fps)
        return dict(
            num_train=self.synthetic_num_train,
            num_eval=self.synthetic_num_eval,
            num_frames=(self.num_frames - 1) * step + 1,
            size=size,
            seed=self.seed,
            fps=SYNTHETIC_FPS,
        )

    def prepare_data(self) -> None:
        """Build synthetic shards in `root` when asked to and no usable dataset is there (runs on one process).

        An existing synthetic build made with other arguments is rebuilt, with a warning naming the differences.
        """
        if not self.will_build_synthetic():
            return
        manifest = read_manifest(self.root)
        args = self._synthetic_args()
        reason = synthetic_mismatch(self.root, **args)
        if reason is None:
            return
        if manifest is not None:
            log.warning("rebuilding the synthetic data in %s: %s", self.root, reason)
        write_synthetic_shards(self.root, **args)

    def will_build_synthetic(self) -> bool:
        """Whether `prepare_data` may write synthetic shards into `root`: an outdated synthetic build there is
        rebuilt unless `build_synthetic` is false; a root without a manifest is built into only where
        `build_synthetic` names it (or is true)."""
        if self.build_synthetic is False or self.train_shards or self.eval_shards:
            return False
        manifest = read_manifest(self.root)
        if manifest is not None:
            return manifest.get("generator") == GENERATOR_NAME  # a real dataset is never overwritten
        return self.build_synthetic is True or Path(self.build_synthetic).resolve() == self.root.resolve()

    def _how_to_fix(self, manifest: dict | None) -> str:
        """How to get the missing shards: build synthetic data for a synthetic (or empty) root, else rebuild."""
        if manifest is None and isinstance(self.build_synthetic, str):
            return (f"expected webdataset shards listed by a manifest.json there, or shard patterns "
                    f"(train_shards, eval_shards); synthetic data is built only at "
                    f"build_synthetic={self.build_synthetic} (or wherever build_synthetic is true)")
        if manifest is None or manifest.get("generator") == GENERATOR_NAME:
            return (f"build synthetic data with `python data/make_synthetic.py --out {self.root}` "
                    "or set build_synthetic=true")
        return f"rebuild the dataset with the builder that wrote it ({manifest.get('generator')})"

    def shard_urls(self, split: str) -> list[str]:
        """Return the existing shard paths of `split` ("train" or "eval"), or raise FileNotFoundError saying how to fix it."""
        pattern = self.train_shards if split == "train" else self.eval_shards
        manifest = read_manifest(self.root) if pattern is None else None
        how = (self._how_to_fix(manifest) if pattern is None else
               f"check the {split}_shards pattern (shard names relative to root, or absolute)")
        if pattern is None:
            if manifest is None:
                where = "no such folder" if not self.root.exists() else f"no manifest.json in {self.root}"
                raise FileNotFoundError(f"{where} and no {split}_shards pattern given; {how}")
            if split not in manifest.get("splits", {}):
                raise FileNotFoundError(self._missing_split_message(manifest, split))
            names = manifest["splits"][split]["shards"]
        else:
            names = list(braceexpand.braceexpand(pattern))
        if all(is_remote(name) for name in names):
            return names  # webdataset opens URLs and `pipe:` commands itself; they cannot be checked here
        paths = [str(self.root / name) for name in names]
        missing = [path for path in paths if not Path(path).is_file()]
        if missing or not paths:
            shown = missing[0] if missing else pattern
            raise FileNotFoundError(f"{len(missing)} of {len(paths)} {split} shards missing (e.g. {shown}); {how}")
        return paths

    def shard_clip_counts(self, split: str) -> dict[str, int]:
        """Shard url -> number of samples, from the manifest's ``shard_clips`` (also for the shards of a pattern
        that the manifest in `root` lists), else from the record a builder wrote beside each shard (``.done``).
        Shards with neither are left out: one that ends early counts as at least one lost clip."""
        manifest = read_manifest(self.root)
        info = (manifest or {}).get("splits", {}).get(split, {})
        names, listed = info.get("shards", []), info.get("shard_clips")
        counts: dict[str, int] = {}
        if listed and len(listed) == len(names):
            counts = {name if is_remote(name) else str(self.root / name): count for name, count in zip(names, listed)}
        for url in self.shard_urls(split):
            if url not in counts and not is_remote(url) and (count := recorded_clip_count(url)) is not None:
                counts[url] = count
        return counts

    def num_clips(self, split: str) -> int | None:
        """The manifest's clip count of ``split`` (None without a manifest or with a shard pattern)."""
        pattern = self.train_shards if split == "train" else self.eval_shards
        manifest = read_manifest(self.root) if pattern is None else None
        return (manifest or {}).get("splits", {}).get(split, {}).get("num_clips")

    def _missing_split_message(self, manifest: dict, split: str) -> str:
        """Why `split` cannot be read from a manifest that lacks it, and the options there are."""
        has = sorted(manifest.get("splits", {}))
        head = f"{self.root / 'manifest.json'} lists no {split!r} split (it has {has})"
        if manifest.get("generator") == GENERATOR_NAME:
            return f"{head}; {self._how_to_fix(manifest)}"
        pattern_arg = "train_shards" if split == "train" else "eval_shards"
        if split == "train":
            return (f"{head}; pass --data.init_args.{pattern_arg} with a shard pattern of training clips "
                    f"(absolute, or relative to {self.root}), or point root at a dataset with a 'train' split")
        if manifest.get("format") == LATENT_FORMAT:
            return (f"{head}. Either encode that split too (python data/encode_latents.py --splits train {split}, "
                    f"from data that has it), pass --data.init_args.{pattern_arg} with a pattern of latent shards "
                    f"of held-out clips (absolute, or relative to {self.root}), or turn validation off with "
                    "--trainer.limit_val_batches=0")
        return (f"{head}. Either pass --data.init_args.{pattern_arg} with a shard pattern of held-out clips "
                f"(absolute, or relative to {self.root}), e.g. MSR-VTT test shards from data/build_msrvtt.py: "
                f"'/path/to/msrvtt/test-{{000000..000002}}.tar', or turn validation off with "
                "--trainer.limit_val_batches=0")

    def resolved_format(self) -> str:
        """The shard format in use: `sample_format`, or with "auto" the manifest's `format` (else video)."""
        if self.sample_format != "auto":
            return self.sample_format
        manifest = read_manifest(self.root)
        return manifest.get("format", "video") if manifest else "video"

    def _rank_and_world_size(self) -> tuple[int, int]:
        """Global rank and world size of the attached trainer, or (0, 1) when used on its own."""
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _loader(self, dataset: Any) -> DataLoader:
        """Wrap a batched pipeline in a DataLoader that passes its batches through unchanged."""
        return DataLoader(
            dataset, batch_size=None, num_workers=self.num_workers, persistent_workers=self.num_workers > 0
        )

    def train_dataloader(self) -> DataLoader:
        """Infinite resampled training batches, cut into epochs of about `train_steps_per_epoch` batches."""
        rank, _ = self._rank_and_world_size()
        resume_step = self.resume_step
        if resume_step is None:
            resume_step = 0 if self.trainer is None else self.trainer.global_step
        pipeline = train_pipeline(
            self.shard_urls("train"),
            self.num_frames,
            self.resolution,
            self.batch_size,
            frame_stride=self.frame_stride,
            seed=self.seed,
            rank=rank,
            resume_step=resume_step,
            shuffle_buffer=self.shuffle_buffer,
            target_fps=self.target_fps,
            sample_format=self.resolved_format(),
            shard_clips=self.shard_clip_counts("train"),
        )
        batches_per_worker = math.ceil(self.train_steps_per_epoch / max(1, self.num_workers))
        return self._loader(pipeline.with_epoch(batches_per_worker))

    def val_dataloader(self) -> DataLoader:
        """Every evaluation clip once (split across ranks), from its first frame; the last batch may be partial."""
        rank, world_size = self._rank_and_world_size()
        pipeline = eval_pipeline(
            self.shard_urls("eval"),
            self.num_frames,
            self.resolution,
            self.batch_size,
            frame_stride=self.frame_stride,
            rank=rank,
            world_size=world_size,
            target_fps=self.target_fps,
            sample_format=self.resolved_format(),
            shard_clips=self.shard_clip_counts("eval"),
        )
        return self._loader(pipeline)

    def predict_items(self) -> list[dict]:
        """Prompt x seed grid as `{"caption", "seed", "index"}` dicts; seeds are `seed + index`, so reruns match."""
        items = []
        for caption in self.predict_prompts:
            for _ in range(self.predict_seeds_per_prompt):
                index = len(items)
                items.append({"caption": caption, "seed": self.seed + index, "index": index})
        return items

    def predict_dataloader(self) -> DataLoader:
        """Batches of `{"caption": list[str], "seed": LongTensor (B,), "index": LongTensor (B,)}` over prompts x seeds.

        With several ranks the items are padded to a multiple of the world size with placeholders
        (``index = -1``, dropped by ``predict_step``): Lightning splits predict items across ranks without
        repeating any, so otherwise one rank would run a batch more than another, and under a sharded
        strategy (FSDP, ZeRO-3) the ranks' forward passes would stop matching and hang.
        """
        items = self.predict_items()
        world_size = self.trainer.world_size if self.trainer is not None else 1
        items += [dict(items[-1], index=-1) for _ in range((-len(items)) % world_size)]
        return DataLoader(items, batch_size=self.batch_size, shuffle=False)
