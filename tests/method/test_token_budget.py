"""Token-budget batches: the stage probabilities that keep ``stage_weights`` as each stage's share of training
clips (derived in docs/method.md), checked exactly and by Monte Carlo over the seeded per-step draw."""

from __future__ import annotations

import math

import pytest

from tpdiff_lightning.method.token_budget import (clip_balanced_probabilities, clip_shares, clips_per_batch,
                                                  draw_stage)

CASES = [  # (stage weights, tokens per clip at each stage, budget)
    ((1, 1, 1), (1024, 2048, 4096), 8192),
    ((1, 2, 1), (16, 32, 64), 128),
    ((0.5, 0.3, 0.2), (2340, 4290, 8190), 32760),  # Wan 480p at degree 4, anchored frames: uneven ratios
    ((1, 1), (100, 400), 350),  # a budget below two full-rate clips
    ((3, 1, 1, 1), (1, 2, 4, 8), 8),
]


@pytest.mark.parametrize("weights,tokens,budget", CASES)
def test_the_corrected_draw_gives_each_stage_its_weight_of_clips(weights, tokens, budget):
    clips = clips_per_batch(budget, tokens)
    p = clip_balanced_probabilities(weights, clips)
    assert math.isclose(sum(p), 1.0, rel_tol=1e-12)
    for share, w in zip(clip_shares(p, clips), weights):
        assert share == pytest.approx(w / sum(weights), rel=1e-12)


def test_equal_clips_per_stage_leave_the_weights_unchanged():
    """With one clip count for every stage (fixed batches), the corrected draw is the plain one."""
    assert clip_balanced_probabilities((1, 2, 1), (4, 4, 4)) == pytest.approx([0.25, 0.5, 0.25], rel=1e-12)


def test_clips_per_batch_fill_the_budget_and_keep_one_clip_above_it():
    assert clips_per_batch(4096, [1024, 1500, 4096, 5000]) == [4, 2, 1, 1]


def monte_carlo_shares(probabilities, clips, draws: int, chunks: int = 20) -> tuple[list[float], list[float]]:
    """Each stage's share of clips over ``draws`` seeded per-step draws, and its standard error over chunks."""
    per_chunk = draws // chunks
    shares = []
    for c in range(chunks):
        counts = [0] * len(clips)
        for index in range(c * per_chunk, (c + 1) * per_chunk):
            stage = draw_stage(probabilities, seed=7, index=index)
            counts[stage] += clips[stage]
        shares.append([n / sum(counts) for n in counts])
    means = [sum(s[i] for s in shares) / chunks for i in range(len(clips))]
    errors = [math.sqrt(sum((s[i] - means[i]) ** 2 for s in shares) / (chunks - 1) / chunks) for i in range(len(clips))]
    return means, errors


@pytest.mark.parametrize("weights,tokens,budget", CASES[:3])
def test_monte_carlo_clip_shares_match_the_stage_weights(weights, tokens, budget):
    clips = clips_per_batch(budget, tokens)
    target = [w / sum(weights) for w in weights]
    means, errors = monte_carlo_shares(clip_balanced_probabilities(weights, clips), clips, draws=8000)
    for mean, error, expected in zip(means, errors, target):
        assert abs(mean - expected) <= 4 * error + 1e-9, (means, errors, target)
    # Without the correction the cheap stages take far more than their weight: the test can tell the two apart.
    plain, plain_errors = monte_carlo_shares([w / sum(weights) for w in weights], clips, draws=8000)
    assert max(abs(m - t) / e for m, t, e in zip(plain, target, plain_errors)) > 10


def test_the_draw_depends_on_the_seed_and_the_step_only():
    p = clip_balanced_probabilities((1, 1, 1), (4, 2, 1))
    first = [draw_stage(p, 3, k) for k in range(200)]
    assert first == [draw_stage(p, 3, k) for k in range(200)]  # every worker and rank draws the same
    assert first != [draw_stage(p, 4, k) for k in range(200)]
    assert set(first) == {0, 1, 2}
