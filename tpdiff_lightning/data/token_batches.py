"""Batches of one bucket sized by a token budget, with the stage of each batch drawn before it is assembled.

The training stream's decoded clips (each with its ``bucket``) wait in a per-bucket buffer. For each batch the
stage is drawn first, from the batch's index alone (``method.token_budget.draw_stage``), so every data worker and
every data-parallel rank agrees on it; the batch is then the first bucket to hold as many clips as the budget
allows at that stage. Clips beyond the budget stay in the buffer for a later batch; none is dropped. The buffer is
bounded: past ``max_buffer`` clips the fullest bucket goes out as a smaller batch.

Batch ``j`` of worker ``w`` (of ``W``) in pass ``p`` over the stream is micro-step
``first_step + p * W * batches_per_worker + j * W + w``: the DataLoader takes the workers' batches in turn, so
that is the order in which the training loop receives them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from torch.utils.data import get_worker_info

from tpdiff_lightning.data.buckets import Bucket
from tpdiff_lightning.method.token_budget import clip_balanced_probabilities, clips_per_batch, draw_stage


@dataclass(frozen=True)
class BatchPlan:
    """What the batcher needs from the model: each bucket's tokens per clip at every stage, the budget, and the
    stage draw."""

    stage_tokens: dict[Bucket, tuple[int, ...]]
    """Backbone tokens per clip of each bucket at each stage (denoising order)."""
    budget: int | None
    """Tokens per batch; None for ``fixed_clips`` clips per batch."""
    stage_weights: tuple[float, ...]
    """The pyramid's ``stage_weights``: each stage's share of training clips."""
    reference: Bucket
    """The shape whose clip counts set the stage probabilities (the configured clip)."""
    reference_tokens: tuple[int, ...]
    stage_aware: bool = True
    """Draw the stage before the batch and size it at that stage; False sizes every batch at the full-rate stage
    (the stage is then drawn by the module, as with fixed batches)."""
    stage_seed: int = 0
    fixed_clips: int | None = None
    """Without a budget: clips per batch (buckets alone)."""

    @property
    def probabilities(self) -> list[float]:
        """Stage draw probabilities that keep ``stage_weights`` as shares of training clips."""
        return clip_balanced_probabilities(self.stage_weights, clips_per_batch(self.budget, self.reference_tokens))

    def clips(self, bucket: Bucket, stage: int | None) -> int:
        """Clips of ``bucket`` one batch holds at ``stage`` (None: at the full-rate stage)."""
        if self.budget is None:
            return self.fixed_clips
        tokens = self.stage_tokens[bucket]
        return clips_per_batch(self.budget, [tokens[-1 if stage is None else stage]])[0]

    def stage_of(self, step: int) -> int | None:
        """The stage of micro-step ``step`` (None when the module draws it)."""
        return draw_stage(self.probabilities, self.stage_seed, step) if self.stage_aware else None


class TokenBudgetBatches:
    """Pipeline stage: decoded clips in, batches of one bucket within the token budget out (see the module doc).

    ``collate`` stacks a list of clips into a batch; the batch gains ``stage`` (an int, absent when the module
    draws it), ``bucket`` (``"FxHxW"``), ``bucket_index`` (its place in the bucket list) and ``tokens`` (the batch's backbone tokens at its stage, an int).
    """

    def __init__(self, plan: BatchPlan, collate: Callable[[list[dict]], dict], first_step: int,
                 batches_per_worker: int, max_buffer: int | None = None) -> None:
        self.plan, self.collate = plan, collate
        self.first_step, self.batches_per_worker = first_step, batches_per_worker
        most = max(plan.clips(b, s) for b in plan.stage_tokens for s in range(len(plan.stage_weights)))
        self.max_buffer = max_buffer or 4 * most * len(plan.stage_tokens)
        self.bucket_index = {b: n for n, b in enumerate(plan.stage_tokens)}
        self.passes = 0

    def steps(self) -> Iterator[int]:
        """The micro-steps of this worker's batches in this pass."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        base = self.first_step + (self.passes - 1) * workers * self.batches_per_worker + worker
        j = 0
        while True:
            yield base + j * workers
            j += 1

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        self.passes += 1
        buffers: dict[Bucket, list[dict]] = defaultdict(list)
        steps = self.steps()
        stage = self.plan.stage_of(next(steps))
        held = 0
        for clip in src:
            buffers[clip["bucket"]].append(clip)
            held += 1
            while True:
                ready = [b for b, clips in buffers.items() if len(clips) >= self.plan.clips(b, stage)]
                if ready:
                    bucket = max(ready, key=lambda b: len(buffers[b]) / self.plan.clips(b, stage))
                    take = self.plan.clips(bucket, stage)
                elif held > self.max_buffer:  # bounded memory: the fullest bucket goes out under budget
                    bucket = max(buffers, key=lambda b: len(buffers[b]) / self.plan.clips(b, stage))
                    take = len(buffers[bucket])
                else:
                    break
                batch, buffers[bucket] = buffers[bucket][:take], buffers[bucket][take:]
                held -= take
                yield self.finish(self.collate(batch), bucket, stage)
                stage = self.plan.stage_of(next(steps))

    def finish(self, batch: dict, bucket: Bucket, stage: int | None) -> dict:
        """Python ints, not tensors: the training step reads them without a device round trip."""
        tokens = self.plan.stage_tokens[bucket][-1 if stage is None else stage]
        batch["bucket"] = str(bucket)
        batch["bucket_index"] = self.bucket_index[bucket]
        batch["tokens"] = tokens * len(batch["caption"])
        if stage is not None:
            batch["stage"] = stage
        return batch
