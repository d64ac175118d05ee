"""How a backbone meets context parallelism without depending on it: for one forward pass it is handed a
``TokenSplit`` (``tpdiff_lightning.distributed.context_parallel.SequenceSplit``) and keeps only its share of the
tokens, attends through it, and gathers its output through it."""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

from torch import Tensor, nn


class TokenSplit(Protocol):
    """One forward pass's token sequence, split over the ranks of a context-parallel group."""

    def shard(self, x: Tensor, dim: int = 1) -> Tensor:
        """This rank's contiguous share of the sequence along ``dim``."""

    def attention(self, q: Tensor, k: Tensor, v: Tensor, prefix: int = 0, mask: Tensor | None = None) -> Tensor:
        """Self-attention of ``(B, H, prefix + n, d)`` queries over every rank's tokens: the first ``prefix`` tokens
        are the same on every rank (a caption in joint attention), the other ``n`` are this rank's share. ``mask``
        is a boolean key mask over the prefix and the whole sequence, ``(B, 1, 1, prefix + N)``."""

    def gather(self, x: Tensor) -> Tensor:
        """The whole ``(B, N, ...)`` sequence from every rank's share (its gradient: this rank's slice)."""


TokenSplitFactory = Callable[[int], "TokenSplit | None"]
"""Given a sequence's token count, its split for this forward pass (None: not split)."""


def patch_size(backbone: nn.Module) -> tuple[int, int, int]:
    """The backbone's patch ``(p_t, p_h, p_w)`` from its ``patch_size`` (an int, ``(p_h, p_w)`` or Wan's
    ``(p_t, p_h, p_w)``, on the backbone or its diffusers model's config); ``(1, 1, 1)`` without one (a UNet)."""
    patch = getattr(backbone, "patch_size", None)
    if patch is None and hasattr(backbone, "model"):
        patch = getattr(getattr(backbone.model, "config", None), "patch_size", None)
    if isinstance(patch, (tuple, list)):
        return (1, *patch) if len(patch) == 2 else tuple(patch)
    return 1, patch or 1, patch or 1


def token_count(backbone: nn.Module, shape: Sequence[int]) -> int:
    """Tokens per clip of latents of ``shape`` ``(F, H, W)`` in ``backbone`` (its ``patch_size``; a backbone without
    one, a UNet, counts latents)."""
    F, H, W = shape
    p_t, p_h, p_w = patch_size(backbone)
    return (F // p_t) * (H // p_h) * (W // p_w)
