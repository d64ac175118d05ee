"""Batches sized by a token budget, and the stage draw that keeps each stage's share of training clips.

A batch of a fixed token budget ``T`` holds ``n_i = max(1, floor(T / tokens_i))`` clips at stage ``i``, where
``tokens_i`` is the backbone's tokens per clip at that stage's shape: a stage at a quarter of the frame rate holds
about four times the clips of the full-rate one. If stages were drawn with the probabilities ``w_i`` of
``stage_weights``, stage ``i``'s share of the *clips* trained on would be ``w_i n_i / sum_j w_j n_j``, skewed
towards the cheap stages. Drawing stage ``i`` with

    p_i = (w_i / n_i) / sum_j (w_j / n_j)

gives each stage the clip share ``p_i n_i / sum_j p_j n_j = w_i / sum_j w_j``, what ``stage_weights`` says
(docs/method.md derives it). The draw is seeded by the batch's index alone, so every data-parallel rank and every
data worker draws the same stage for the same step.
"""

from __future__ import annotations

from typing import Sequence

import torch


def clips_per_batch(budget: int, tokens: Sequence[int]) -> list[int]:
    """Clips a batch of ``budget`` tokens holds at each stage (at least one: a clip above the budget trains alone)."""
    return [max(1, budget // t) for t in tokens]


def clip_balanced_probabilities(weights: Sequence[float], clips: Sequence[int]) -> list[float]:
    """Stage draw probabilities ``p_i ~ w_i / n_i`` that give stage ``i`` the share ``w_i / sum w`` of training
    clips when its batches hold ``n_i`` clips."""
    if len(weights) != len(clips):
        raise ValueError(f"{len(weights)} stage weights for {len(clips)} stages")
    raw = [w / n for w, n in zip(weights, clips)]
    total = sum(raw)
    return [r / total for r in raw]


def clip_shares(probabilities: Sequence[float], clips: Sequence[int]) -> list[float]:
    """Each stage's expected share of training clips when drawn with ``probabilities`` and holding ``clips``."""
    raw = [p * n for p, n in zip(probabilities, clips)]
    total = sum(raw)
    return [r / total for r in raw]


def draw_stage(probabilities: Sequence[float], seed: int, index: int) -> int:
    """The stage of batch ``index`` (a micro-step), drawn from a generator seeded by ``(seed, index)`` only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return int(torch.multinomial(torch.tensor(probabilities, dtype=torch.float64), 1, generator=generator))
