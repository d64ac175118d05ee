"""The Fréchet distance between two Gaussians, in float64, through symmetric square roots only."""

from __future__ import annotations

import torch
from torch import Tensor


def symmetric_sqrt(matrix: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix via ``eigh``, negative eigenvalues clamped to 0."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """``||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr sqrt(sqrt(S1) S2 sqrt(S1))``, clamped at 0, in float64.

    The product is symmetrised before its eigenvalues are taken; ``eigvalsh(S1 @ S2)`` would be wrong,
    since ``S1 @ S2`` is not symmetric.
    """
    mu1, mu2, sigma1, sigma2 = (x.to(torch.float64) for x in (mu1, mu2, sigma1, sigma2))
    root1 = symmetric_sqrt(sigma1)
    product = root1 @ sigma2 @ root1
    product = (product + product.T) / 2
    trace_sqrt = torch.linalg.eigvalsh(product).clamp_min(0).sqrt().sum()
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return distance.clamp_min(0)


def gaussian_from_sums(total: Tensor, outer: Tensor, count: Tensor | int) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance from a feature sum ``(D,)``, sum of outer products ``(D, D)`` and a count."""
    n = float(count)
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 samples; got {int(n)}")
    mean = total / n
    cov = (outer - n * torch.outer(mean, mean)) / (n - 1)
    return mean, cov
