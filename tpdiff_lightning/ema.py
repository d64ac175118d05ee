"""An exponential moving average of a network's weights, kept as a frozen copy."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """Frozen shadow copy of ``model`` whose weights track ``decay * shadow + (1 - decay) * model``.

    The shadow is a submodule, so it is saved in and restored from checkpoints with the rest.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay={decay} is invalid; expected 0 <= decay < 1")
        self.shadow = copy.deepcopy(model).requires_grad_(False).eval()
        self.decay = decay
        self.warmup = warmup
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        """The decay, ramped up as ``(1 + n) / (10 + n)`` at first so early weights are forgotten quickly."""
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow weights one step towards ``model``'s; buffers are copied as they are."""
        decay = self.current_decay()
        params = [p for p in model.parameters() if p.requires_grad]
        shadow = [s for s, p in zip(self.shadow.parameters(), model.parameters()) if p.requires_grad]
        if params:
            torch._foreach_lerp_(shadow, [p.detach().to(s.dtype) for s, p in zip(shadow, params)], 1.0 - decay)
        for s, b in zip(self.shadow.buffers(), model.buffers()):
            s.copy_(b)
        self.num_updates += 1

    def train(self, mode: bool = True) -> "EMA":
        # The shadow only ever runs in evaluation mode.
        super().train(mode)
        self.shadow.eval()
        return self
