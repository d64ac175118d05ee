import pytest
import torch

from tpdiff_lightning.method.alignment import align_noise, alignment_cost, alignment_permutation


def _total(x0, noise):
    return float(((x0 - noise) ** 2).flatten(1).sum(1).sum())


@pytest.mark.parametrize("batch", [2, 4, 8, 16])
def test_alignment_is_a_permutation_that_never_raises_cost(batch):
    g = torch.Generator().manual_seed(batch)
    for _ in range(5):
        x0 = torch.randn(batch, 3, 4, 8, 8, generator=g, dtype=torch.float64)
        noise = torch.randn(batch, 3, 4, 8, 8, generator=g, dtype=torch.float64)
        perm = alignment_permutation(x0, noise)
        assert sorted(perm.tolist()) == list(range(batch))
        aligned = align_noise(x0, noise)
        assert torch.equal(aligned, noise[perm])
        assert _total(x0, aligned) <= _total(x0, noise) + 1e-6


def test_alignment_finds_the_optimum_against_brute_force():
    import itertools

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 2, 3, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(5, 2, 3, 4, 4, generator=g, dtype=torch.float64)
    best = min(_total(x0, noise[list(p)]) for p in itertools.permutations(range(5)))
    assert abs(_total(x0, align_noise(x0, noise)) - best) < 1e-6


def test_alignment_recovers_a_planted_pairing_and_leaves_data_alone():
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(8, 3, 4, 8, 8, generator=g)
    x0 = noise[torch.tensor([3, 1, 7, 0, 2, 6, 5, 4])] + 0.01 * torch.randn(8, 3, 4, 8, 8, generator=g)
    x0_before = x0.clone()
    aligned = align_noise(x0, noise)
    assert torch.allclose(aligned, x0, atol=0.1)
    assert torch.equal(x0, x0_before)


def test_cost_is_float32_and_does_not_overflow_in_half_precision():
    x0 = torch.full((2, 4, 16, 64, 64), 3.0, dtype=torch.float16)  # squared norm ~ 2.4e6 > fp16 max
    noise = torch.zeros_like(x0)
    cost = alignment_cost(x0, noise)
    assert cost.dtype == torch.float32 and torch.isfinite(cost).all()
    assert abs(float(cost[0, 0]) - 9.0 * x0[0].numel()) / (9.0 * x0[0].numel()) < 1e-5


def test_switch_off_and_batch_of_one_return_noise_unchanged():
    x0, noise = torch.randn(4, 3, 2, 4, 4), torch.randn(4, 3, 2, 4, 4)
    assert align_noise(x0, noise, enabled=False) is noise
    assert align_noise(x0[:1], noise[:1]) is noise[:1] or torch.equal(align_noise(x0[:1], noise[:1]), noise[:1])


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\(4, 3, 2, 4, 4\).*\(4, 3, 4, 4, 4\)"):
        align_noise(torch.randn(4, 3, 2, 4, 4), torch.randn(4, 3, 4, 4, 4))


def test_non_finite_data_is_a_clear_error():
    x0 = torch.randn(4, 3, 2, 4, 4)
    x0[1, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        align_noise(x0, torch.randn(4, 3, 2, 4, 4))


def test_cost_is_float32_under_autocast():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(6, 3, 8, 16, 16, generator=g) * 4
    noise = torch.randn(6, 3, 8, 16, 16, generator=g)
    reference = alignment_cost(x0.double(), noise.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cost = alignment_cost(x0, noise)
    assert cost.dtype == torch.float32
    assert torch.allclose(cost, reference, rtol=1e-5)
