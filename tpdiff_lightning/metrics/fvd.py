"""Fréchet Video Distance as a torchmetrics ``Metric``: I3D logits, float64 sums, synced across ranks."""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor
from torchmetrics import Metric

from tpdiff_lightning.metrics.frechet import frechet_distance, gaussian_from_sums

FEATURE_DIM = 400  # Kinetics-400 logits of I3D, averaged over time


class FVD(Metric):
    """FVD between the videos passed with ``real=True`` and with ``real=False``.

    ``update(videos, real)`` takes uint8 ``(B, T, H, W, 3)`` or float in [0, 1] of the same layout.
    Real statistics can instead be set once from a cache with :meth:`set_real_statistics`.

    Args:
        feature_extractor: ``videos -> (B, D)`` features; default the Kinetics-400 I3D (loaded on first use).
        feature_dim: D.
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, feature_extractor: Callable[[Tensor], Tensor] | None = None,
                 feature_dim: int = FEATURE_DIM, **kwargs):
        super().__init__(**kwargs)
        self._extractor = feature_extractor
        for kind in ("real", "fake"):
            self.add_state(f"{kind}_sum", torch.zeros(feature_dim, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{kind}_outer", torch.zeros(feature_dim, feature_dim, dtype=torch.float64),
                           dist_reduce_fx="sum")
            self.add_state(f"{kind}_count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def features(self, videos: Tensor) -> Tensor:
        """Features ``(B, D)`` in float64 of a batch of videos."""
        if self._extractor is None:
            from tpdiff_lightning.metrics.i3d import i3d_features, load_i3d

            self._extractor = functools.partial(i3d_features, load_i3d(device=self.device))
        return self._extractor(videos).to(torch.float64)

    def update(self, videos: Tensor, real: bool) -> None:
        if videos.ndim != 5 or videos.shape[-1] != 3:
            raise ValueError(f"videos have shape {tuple(videos.shape)}; expected (B, T, H, W, 3)")
        feats = self.features(videos)  # (B, D)
        self.add_features(feats, real)

    def add_features(self, feats: Tensor, real: bool) -> None:
        """Accumulate already extracted features ``(B, D)``."""
        kind = "real" if real else "fake"
        feats = feats.to(torch.float64)
        setattr(self, f"{kind}_sum", getattr(self, f"{kind}_sum") + feats.sum(0))
        setattr(self, f"{kind}_outer", getattr(self, f"{kind}_outer") + feats.T @ feats)
        setattr(self, f"{kind}_count", getattr(self, f"{kind}_count") + feats.shape[0])

    def set_real_statistics(self, total: Tensor, outer: Tensor, count: int) -> None:
        """Use cached real sums instead of real videos (only on one rank, or divide them: they are summed)."""
        self.real_sum = total.to(self.real_sum)
        self.real_outer = outer.to(self.real_outer)
        self.real_count = torch.tensor(float(count), dtype=torch.float64, device=self.real_count.device)

    def real_statistics(self) -> tuple[Tensor, Tensor, int]:
        """The (synced) real sums, to cache on disk."""
        return self.real_sum.clone(), self.real_outer.clone(), int(self.real_count)

    def compute(self) -> Tensor:
        mu_r, cov_r = gaussian_from_sums(self.real_sum, self.real_outer, self.real_count)
        mu_f, cov_f = gaussian_from_sums(self.fake_sum, self.fake_outer, self.fake_count)
        return frechet_distance(mu_r, cov_r, mu_f, cov_f)
