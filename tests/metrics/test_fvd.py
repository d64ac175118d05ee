import numpy as np
import pytest
import scipy.linalg
import torch

from tpdiff_lightning.metrics.frechet import frechet_distance, gaussian_from_sums
from tpdiff_lightning.metrics.fvd import FVD

F64 = torch.float64


def _scipy_frechet(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _gaussian(seed, d=20, n=500):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d))
    x = rng.normal(size=(n, d)) @ a + rng.normal(size=d)
    return x.mean(0), np.cov(x, rowvar=False)


@pytest.mark.parametrize("seeds", [(0, 1), (2, 3), (4, 5)])
def test_frechet_matches_scipy_sqrtm(seeds):
    (mu1, s1), (mu2, s2) = _gaussian(seeds[0]), _gaussian(seeds[1])
    ours = float(frechet_distance(*(torch.from_numpy(v) for v in (mu1, s1, mu2, s2))))
    assert ours == pytest.approx(_scipy_frechet(mu1, s1, mu2, s2), rel=1e-6)


def test_identical_sets_give_zero_and_a_mean_shift_gives_its_square():
    mu, s = (torch.from_numpy(v) for v in _gaussian(7))
    assert float(frechet_distance(mu, s, mu, s)) == pytest.approx(0.0, abs=1e-6)
    shift = torch.arange(20, dtype=F64) / 10
    assert float(frechet_distance(mu, s, mu + shift, s)) == pytest.approx(float(shift.square().sum()), rel=1e-6)


def test_singular_covariances_stay_finite_and_non_negative():
    x = torch.randn(5, 30, dtype=F64)  # fewer samples than dimensions: rank-deficient covariance
    mu, s = gaussian_from_sums(x.sum(0), x.T @ x, 5)
    d = frechet_distance(mu, s, mu, s)
    assert torch.isfinite(d) and float(d) >= 0 and float(d) < 1e-5


def test_fvd_metric_accumulates_float64_sums_and_merges_like_one():
    proj = torch.randn(12, 8, dtype=F64)
    extractor = lambda v: v.to(F64).flatten(1)[:, :12] @ proj  # a fixed linear "network"
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 255, (40, 9, 2, 2, 3), generator=g, dtype=torch.uint8)
    fake = torch.randint(0, 200, (40, 9, 2, 2, 3), generator=g, dtype=torch.uint8)
    whole = FVD(extractor, feature_dim=8)
    whole.update(real, real=True)
    whole.update(fake, real=False)
    halves = [FVD(extractor, feature_dim=8) for _ in range(2)]
    for k, m in enumerate(halves):
        m.update(real[k::2], real=True)
        m.update(fake[k::2], real=False)
    halves[0].merge_state(halves[1])  # what the cross-rank sum does
    assert whole.real_sum.dtype == F64 and float(whole.real_count) == 40
    torch.testing.assert_close(halves[0].compute(), whole.compute())
    feats_r, feats_f = extractor(real), extractor(fake)
    expected = frechet_distance(feats_r.mean(0), torch.cov(feats_r.T), feats_f.mean(0), torch.cov(feats_f.T))
    torch.testing.assert_close(whole.compute(), expected)


def test_fvd_rejects_the_wrong_layout():
    with pytest.raises(ValueError, match=r"\(2, 3, 16, 8, 8\).*\(B, T, H, W, 3\)"):
        FVD(lambda v: v, feature_dim=8).update(torch.zeros(2, 3, 16, 8, 8), real=True)


def test_fvd_is_invariant_to_batching_and_order():
    proj = torch.randn(12, 8, dtype=F64, generator=torch.Generator().manual_seed(1))
    extractor = lambda v: v.to(F64).flatten(1)[:, :12] @ proj
    g = torch.Generator().manual_seed(2)
    real = torch.randint(0, 255, (30, 9, 2, 2, 3), generator=g, dtype=torch.uint8)
    fake = torch.randint(0, 255, (30, 9, 2, 2, 3), generator=g, dtype=torch.uint8)
    one = FVD(extractor, feature_dim=8)
    one.update(real, True)
    one.update(fake, False)
    perm = torch.randperm(30, generator=g)
    many = FVD(extractor, feature_dim=8)
    for chunk in torch.split(perm, 7):
        many.update(fake[chunk], False)
        many.update(real[chunk.flip(0)], True)
    torch.testing.assert_close(many.compute(), one.compute(), rtol=1e-9, atol=1e-9)
