"""The webdataset pipelines: an endless, resampled training stream and an evaluation pass over every clip once.

Every batch of clips is a dict `{"video": (B, 3, F, H, W) float32 in [-1, 1], "caption": list[str],
"key": list[str], "num_skipped": LongTensor (), "skipped": list[str]}`, where `key` names each clip as
"<shard url>:<sample key>" and `skipped` names the clips the producing worker could not use (corrupt mp4, too few
frames, lost to a truncated tar) for the first time since its previous batch; `num_skipped` is their number.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from typing import Callable, Iterable, Iterator, Sequence

import webdataset as wds

from tpdiff_lightning.data.buckets import Bucket
from tpdiff_lightning.data.collation import collate_clips
from tpdiff_lightning.data.decoding import DecodeClips
from tpdiff_lightning.data.lost_clips import CountedShardSamples, SkipCounter
from tpdiff_lightning.data.shuffling import BufferShuffle, worker_seed
from tpdiff_lightning.data.token_batches import BatchPlan, TokenBudgetBatches

# A training stream that has skipped this many samples as too short, from at least MIN_SHORT_SHARDS shards
# (or all of them), before yielding a single clip stops with NoUsableClipsError: no clip is long enough, and the
# resampled stream would otherwise search forever. Any usable clip disarms the check for good, so short clips
# among usable ones never trigger it; the shard count keeps one shard of only short clips from triggering it.
MAX_SHORT_BEFORE_FIRST_CLIP = 1000
MIN_SHORT_SHARDS = 4

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
    plan: BatchPlan | None = None,
    first_step: int = 0,
    batches_per_worker: int = 1,
) -> wds.DataPipeline:
    """Infinite stream of full training batches: resampled shards, seeded shuffle, random clip start.

    Every (seed, rank, worker, resume_step) draws its own shard sequence, so ranks need no node splitter and
    always get the same number of batches; cut the stream into epochs with `.with_epoch(batches_per_worker)`.
    When no clip is long enough for `num_frames` (see MAX_SHORT_BEFORE_FIRST_CLIP) it raises NoUsableClipsError.
    `shard_clips` (url -> sample count, from the manifest) lets it count the samples a truncated shard lost.

    With a token-budget `plan`, each clip is decoded at its bucket (`plan.stage_tokens` names the buckets) and the
    batches are of one bucket within the budget (`TokenBudgetBatches`), the first of them micro-step `first_step`.
    """
    counter = SkipCounter()
    seeds = dict(seed=seed, rank=rank, resume_step=resume_step)
    shard_seed = functools.partial(worker_seed, seed, rank, resume_step, 0)
    collate = functools.partial(collate_clips, counter=counter)
    if plan is None:
        batches = wds.batched(batch_size, collation_fn=collate, partial=False)
    else:
        batches = TokenBudgetBatches(plan, collate, first_step, batches_per_worker)
    return wds.DataPipeline(
        wds.ResampledShards(urls, seed=seed, worker_seed=shard_seed, deterministic=True),
        CountedShardSamples(counter, shard_clips),
        BufferShuffle(shuffle_buffer, **seeds),
        DecodeClips(counter, num_frames, frame_stride, resolution, random_start=True, target_fps=target_fps,
                    sample_format=sample_format, max_short=MAX_SHORT_BEFORE_FIRST_CLIP,
                    min_short_shards=min(MIN_SHORT_SHARDS, len(set(urls))),
                    buckets=list(plan.stage_tokens) if plan is not None else None, **seeds),
        batches,
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


def batches_by_bucket(batch_size: int, collate: Callable[[list[dict]], dict]) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """Pipeline stage: clips (each with its ``bucket``) into batches of one bucket, ``batch_size`` clips each as a
    bucket fills, then every bucket's remainder as a last, partial batch: each clip exactly once."""

    def stage(src: Iterable[dict]) -> Iterator[dict]:
        waiting: dict[Bucket, list[dict]] = defaultdict(list)
        for clip in src:
            group = waiting[clip["bucket"]]
            group.append(clip)
            if len(group) == batch_size:
                yield collate(group)
                group.clear()
        for group in waiting.values():
            if group:
                yield collate(group)

    return stage


def bucketed_eval_pipeline(
    urls: list[str],
    buckets: Sequence[Bucket],
    batch_size: int,
    frame_stride: int = 1,
    target_fps: float | None = None,
    shard_clips: dict[str, int] | None = None,
) -> wds.DataPipeline:
    """Each clip of ``urls`` once, from its first frame, decoded at its bucket (``decode_bucketed_clip``), in
    batches of one bucket (``batches_by_bucket``): what a latent cache per bucket encodes. One process, in order."""
    counter = SkipCounter()
    return wds.DataPipeline(
        wds.SimpleShardList(urls),
        CountedShardSamples(counter, shard_clips),
        DecodeClips(counter, min(b.frames for b in buckets), frame_stride, (buckets[0].height, buckets[0].width),
                    random_start=False, target_fps=target_fps, buckets=buckets),
        batches_by_bucket(batch_size, functools.partial(collate_clips, counter=counter)),
    )
