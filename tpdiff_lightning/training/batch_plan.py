"""The model's side of bucketed, token-budget batches: which bucket shapes its pyramid can take, and each
bucket's backbone tokens per clip at every stage (``data.token_batches.BatchPlan``)."""

from __future__ import annotations

from typing import Any, Sequence

from tpdiff_lightning.data.buckets import Bucket
from tpdiff_lightning.data.token_batches import BatchPlan
from tpdiff_lightning.method.pyramid import TemporalPyramid
from tpdiff_lightning.models.token_split import patch_size, token_count

KEY = "data.init_args.buckets"


def bucket_pyramid(module: Any, bucket: Bucket, n: int) -> tuple[TemporalPyramid, int, int]:
    """The pyramid and latent size ``(h, w)`` of bucket ``n``; one line naming the bucket if the model's pyramid,
    codec or patch cannot take its shape."""
    where = f"{KEY}[{n}]=[{bucket.frames}, {bucket.height}, {bucket.width}]"
    try:
        latent_frames = module.latent_frames(bucket.frames)
        pyramid = module.pyramid.with_num_frames(latent_frames)
    except ValueError as error:
        raise ValueError(f"{where} does not fit the pyramid: {error}") from None
    c = getattr(module.codec, "spatial_compression", 1)
    P = pyramid.stages[0].spatial_stride
    _, p_h, p_w = patch_size(module.backbone)
    if bucket.height % (c * P * p_h) or bucket.width % (c * P * p_w):
        raise ValueError(f"{where} does not fit the pyramid: expected height divisible by {c * P * p_h} and width by "
                         f"{c * P * p_w} (the codec's {c}x x stage 0's spatial stride {P} x the backbone's patch "
                         f"{p_h}x{p_w})")
    return pyramid, bucket.height // c, bucket.width // c


def stage_tokens(module: Any, pyramid: TemporalPyramid, height: int, width: int) -> tuple[int, ...]:
    """Backbone tokens per clip of ``height x width`` latents at each stage of ``pyramid``."""
    return tuple(token_count(module.backbone, (s.num_frames, height // s.spatial_stride, width // s.spatial_stride))
                 for s in pyramid.stages)


def batch_plan(module: Any, buckets: Sequence[Bucket], budget: int | None, stage_aware: bool,
               clips: int | None = None) -> BatchPlan:
    """The plan of ``module``'s batches over ``buckets`` (checked against its pyramid): ``budget`` tokens per
    batch, or (``budget`` None) ``clips`` clips per batch."""
    tokens = {}
    for n, bucket in enumerate(buckets):
        pyramid, h, w = bucket_pyramid(module, bucket, n)
        tokens[bucket] = stage_tokens(module, pyramid, h, w)
    H, W = module.latent_size()
    clip = module.settings.clip
    reference = Bucket(clip.num_frames, *module.frame_size)
    return BatchPlan(tokens, budget, tuple(module.pyramid.stage_weights), reference,
                     stage_tokens(module, module.pyramid, H, W), stage_aware and budget is not None,
                     module.settings.objective.stage_seed, clips)
