"""Training FLOPs of a run, for curves against compute: torch's ``FlopCounterMode`` counts the first step of each
(stage, batch shape) as it runs (forward, backward and the text encoder: every matmul, convolution and attention),
and every later step of the same kind adds that count. Times the world size, since every rank does as much."""

from __future__ import annotations

import warnings
from typing import Any, Hashable

from torch.utils.flop_counter import FlopCounterMode


class FlopMeter:
    """FLOPs of the steps trained so far (``total``); ``begin(key)`` before a step and ``end(world)`` after it."""

    def __init__(self, total: float = 0.0):
        self.total = total
        self.per_step: dict[Hashable, float] = {}
        self.enabled = True
        self._mode: FlopCounterMode | None = None
        self._key: Hashable | None = None

    def begin(self, key: Hashable) -> None:
        """A step of kind ``key`` starts: counted now if no step of its kind has been."""
        self._key = key if self.enabled else None
        if self._key is not None and key not in self.per_step:
            self._mode = FlopCounterMode(display=False)
            self._mode.__enter__()

    def end(self, world_size: int = 1) -> None:
        """The step begun last has finished; add its FLOPs (``world_size`` ranks' worth)."""
        if self._mode is not None:
            mode, self._mode = self._mode, None
            try:
                mode.__exit__(None, None, None)
                self.per_step[self._key] = float(mode.get_total_flops())
            except Exception as error:  # a strategy whose tensors the counter cannot read: no FLOPs axis, no failure
                warnings.warn(f"training FLOPs are not counted ({type(error).__name__}: {error}); the FLOPs axes "
                              "stay empty")
                self.enabled = False
        if self._key is not None and self._key in self.per_step:
            self.total += self.per_step[self._key] * world_size
        self._key = None


def step_kind(module: Any, batch: dict[str, Any], batch_idx: int) -> tuple[int, tuple[int, ...] | None]:
    """What a training step's FLOPs depend on: the stage it trains and its batch's shape (the pixels', or the
    latents' for latent shards); steps of one kind cost the same."""
    shape = next((tuple(batch[k].shape) for k in ("latent", "video") if k in batch), None)
    return module.batch_stage(batch, batch_idx), shape
