"""Global-batch alignment across a real 2-process gloo world equals one alignment of the concatenated batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers.gloo import free_port, join_gloo_group
from tpdiff_lightning.method.alignment import align_noise, alignment_cost
from tpdiff_lightning.method.global_alignment import align_noise_global

WORLD = 2
SHAPE = (3, 3, 4, 8, 8)  # local batch 3, so the 6-clip global batch is not a multiple of anything special


def _global_batch(seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Data and noise of the whole world, ``(WORLD*B, C, F, H, W)``; rank r owns rows r*B … (r+1)*B-1."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(WORLD * SHAPE[0], *SHAPE[1:], generator=g).to(dtype)
    noise = torch.randn(WORLD * SHAPE[0], *SHAPE[1:], generator=g).to(dtype)
    return data, noise


def _worker(rank: int, port: int, out_dir: str) -> None:
    join_gloo_group(rank, port, WORLD)
    try:
        B = SHAPE[0]
        results = {}
        for seed in (0, 1, 2):
            data, noise = _global_batch(seed)
            mine = slice(rank * B, (rank + 1) * B)
            results[seed] = align_noise_global(data[mine], noise[mine])
        data, noise = _global_batch(0)
        results["again"] = align_noise_global(data[rank * B:(rank + 1) * B], noise[rank * B:(rank + 1) * B])
        data, noise = _global_batch(0, torch.bfloat16)
        results["bf16"] = align_noise_global(data[rank * B:(rank + 1) * B], noise[rank * B:(rank + 1) * B])
        try:  # rank 1 has one clip more than rank 0
            n = B + rank
            align_noise_global(torch.randn(n, *SHAPE[1:]), torch.randn(n, *SHAPE[1:]))
            results["unequal"] = "no error"
        except ValueError as e:
            results["unequal"] = str(e)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def world_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("global_alignment")
    mp.start_processes(_worker, args=(free_port(), str(out)), nprocs=WORLD, start_method="spawn", join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_global_alignment_equals_one_alignment_of_the_concatenated_batch(world_results, seed):
    data, noise = _global_batch(seed)
    reference = align_noise(data, noise)  # (WORLD*B, ...)
    got = torch.cat([world_results[r][seed] for r in range(WORLD)])
    torch.testing.assert_close(got, reference, rtol=0, atol=0)


def test_global_alignment_differs_from_per_rank_alignment(world_results):
    B, differs = SHAPE[0], []
    for seed in (0, 1, 2):
        data, noise = _global_batch(seed)
        local = torch.cat([align_noise(data[r * B:(r + 1) * B], noise[r * B:(r + 1) * B]) for r in range(WORLD)])
        got = torch.cat([world_results[r][seed] for r in range(WORLD)])
        differs.append(not torch.equal(local, got))
        # The global optimum can only be at least as good as the per-rank ones.
        assert float((data - got).square().sum()) <= float((data - local).square().sum()) + 1e-3
    assert any(differs)  # draws cross ranks: some clip is paired with noise drawn on the other rank


def test_each_rank_gets_its_own_rows_of_a_permutation_of_the_global_noise(world_results):
    _, noise = _global_batch(0)
    got = torch.cat([world_results[r][0] for r in range(WORLD)])  # (WORLD*B, ...)
    flat, ref = got.flatten(1), noise.flatten(1)
    matches = (flat[:, None, :] == ref[None, :, :]).all(-1)  # (WORLD*B, WORLD*B) which draw each row is
    assert matches.sum(1).tolist() == [1] * len(ref)  # every returned row is one global draw…
    assert matches.sum(0).tolist() == [1] * len(ref)  # …and every draw is used exactly once
    assert not torch.equal(world_results[0][0], world_results[1][0])


def test_global_alignment_is_deterministic_and_lowers_the_global_cost(world_results):
    data, noise = _global_batch(0)
    for r in range(WORLD):
        assert torch.equal(world_results[r]["again"], world_results[r][0])
    got = torch.cat([world_results[r][0] for r in range(WORLD)])
    assert float((data - got).square().sum()) < float((data - noise).square().sum())


def test_half_precision_inputs_keep_their_dtype_and_match_the_reference(world_results):
    data, noise = _global_batch(0, torch.bfloat16)
    got = torch.cat([world_results[r]["bf16"] for r in range(WORLD)])
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, align_noise(data, noise))


def test_unequal_local_batches_raise_on_every_rank_naming_the_shapes(world_results):
    for r in range(WORLD):
        msg = world_results[r]["unequal"]
        assert "same local batch shape" in msg and "(3, 3, 4, 8, 8)" in msg and "(4, 3, 4, 8, 8)" in msg, msg


def test_without_a_process_group_it_is_local_alignment():
    assert not dist.is_initialized()
    data, noise = _global_batch(3)
    assert torch.equal(align_noise_global(data, noise), align_noise(data, noise))


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 8, 8\).*\(2, 3, 2, 8, 8\)"):
        align_noise_global(torch.randn(2, 3, 4, 8, 8), torch.randn(2, 3, 2, 8, 8))


def test_cross_cost_block_matches_brute_force():
    g = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(2, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    brute = ((x0[:, None] - noise[None]) ** 2).flatten(2).sum(-1)  # (2, 5)
    torch.testing.assert_close(alignment_cost(x0, noise), brute, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_global_alignment_bench_quick_writes_json(tmp_path):
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "global_alignment.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "global_alignment.py"), "--quick", "--out", str(out)],
                   check=True, cwd=ROOT, capture_output=True, timeout=120)
    rows = json.loads(out.read_text())["rows"]
    assert [r["global_batch"] for r in rows] == [8, 32] and all(r["total_s"] > 0 for r in rows)
