"""The clips a pipeline cannot use, each counted once: unreadable samples, and the part of a shard cut short."""

from __future__ import annotations

import warnings
from typing import Iterable, Iterator

import webdataset as wds


class CorruptSampleWarning(UserWarning):
    """Warned once per sample that a pipeline drops instead of crashing."""


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
