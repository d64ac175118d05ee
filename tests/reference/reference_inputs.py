"""Inputs of the TensorFlow reference values, regenerated from fixed ``numpy.random.RandomState`` seeds."""

from __future__ import annotations

import numpy as np

RESIZE_CASES: dict[str, tuple[tuple[int, int, int, int], int]] = {
    "upsample_36x48": ((2, 36, 48, 3), 0),      # small generated frames, as in the CPU runs
    "downsample_256x320": ((1, 256, 320, 3), 1),  # larger than I3D's input: every output takes two rows apart
    "odd_225x223": ((1, 225, 223, 3), 2),        # off by one: the clamped last row and column
}
"""name -> (frames shape ``(N, H, W, 3)``, seed)."""

STORED_ROWS = np.asarray(sorted(set(range(0, 224, 3)) | {222, 223}))
"""Rows (and columns) of the 224x224 resized frames kept in the reference file."""

FRECHET_CASES: dict[str, dict] = {
    "full_rank": dict(n=600, dim=400, seed=3),  # more clips than features: nonsingular covariances
    "singular": dict(n=48, dim=400, seed=4),    # fewer clips than features, like a small-N training curve
}


def frames(shape: tuple[int, int, int, int], seed: int) -> np.ndarray:
    """Uniform random uint8 frames."""
    return np.random.RandomState(seed).randint(0, 256, size=shape).astype(np.uint8)


def activations(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two sets of ``(n, dim)`` float32 I3D-logit-like features with correlated dimensions and different
    means and scales."""
    rng = np.random.RandomState(seed)
    mix_real = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    mix_fake = mix_real + 0.3 * rng.normal(size=(dim, dim)) / np.sqrt(dim)
    real = rng.normal(size=(n, dim)) @ mix_real * 4.0 + rng.normal(size=dim)
    fake = rng.normal(size=(n, dim)) @ mix_fake * 5.0 + rng.normal(size=dim) + 0.5
    return real.astype(np.float32), fake.astype(np.float32)
