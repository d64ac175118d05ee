"""Seeds of the data workers, and the training stream's seeded shuffle buffer (webdataset seeds from the time)."""

from __future__ import annotations

import random
from typing import Any, Iterable, Iterator

import numpy as np
import torch


def worker_seed(seed: int, rank: int, resume_step: int, salt: int) -> int:
    """Mix the seed, rank, DataLoader worker id, resume step and a per-stage salt into one 63-bit seed."""
    info = torch.utils.data.get_worker_info()
    worker = 0 if info is None else info.id
    state = np.random.SeedSequence([seed, rank, worker, resume_step, salt]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


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
