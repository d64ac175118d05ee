"""Context parallelism on gloo: a clip's tokens over 2 and 4 processes give the single process's outputs and
parameter gradients (float32), for the built-in DiT, the Flux-style DiT and Wan, at the stage shapes of the
shipped pyramids, uneven token counts included, by Ulysses and (heads not divisible) by gathered keys and values."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from tests.helpers.gloo import free_port, join_gloo_group

TEXT_DIM = 32
LATENT = 4  # channels of the diffusers backbones' latents


def build(kind: str, heads: int):
    """A small random backbone of ``kind`` with ``heads`` attention heads, every weight nonzero."""
    torch.manual_seed(0)
    if kind == "dit":
        from tpdiff_lightning.models.dit import DIT_SIZES, DiTSize, VideoDiT

        DIT_SIZES["dit-cp-test"] = DiTSize(hidden=24 * heads, depth=2, heads=heads, patch=2)
        net = VideoDiT(3, TEXT_DIM, size="dit-cp-test")
    elif kind == "flux":
        from tests.helpers.tiny_flux import tiny_flux_config
        from tpdiff_lightning.models.flux_video import FluxVideoBackbone

        net = FluxVideoBackbone(LATENT, TEXT_DIM, config=tiny_flux_config(LATENT, TEXT_DIM, num_attention_heads=heads))
    else:
        from tests.helpers.tiny_wan import tiny_wan_config
        from tpdiff_lightning.models.wan import WanBackbone

        net = WanBackbone(LATENT, TEXT_DIM, config=tiny_wan_config(LATENT, TEXT_DIM, num_attention_heads=heads))
    for p in net.parameters():  # zero-initialised gates and projections would hide whole branches
        torch.nn.init.normal_(p, std=0.05)
    return net


def inputs(kind: str, frames: int, size: int, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    channels = 3 if kind == "dit" else LATENT
    x = torch.randn(batch, channels, frames, size, size, generator=g)
    t = torch.linspace(250.0, 700.0, batch)
    text = torch.randn(batch, 5, TEXT_DIM, generator=g)
    mask = torch.ones(batch, 5, dtype=torch.bool)
    mask[0, 3:] = False
    return x, t, text, mask


def run(net, case, batch: int = 2, split=None):
    """The output and parameter gradients of ``net`` on the case's inputs, called directly or through
    ``split(net, x, t, text, mask, **strides)``."""
    kind, frames, size, stride, spatial, _ = case
    x, t, text, mask = inputs(kind, frames, size, batch)
    strides = {"stride": stride, **({"spatial_stride": spatial} if spatial > 1 else {})}
    y = net(x, t, text, mask, **strides) if split is None else split(net, x, t, text, mask, **strides)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), {n: p.grad for n, p in net.named_parameters() if p.grad is not None}


# (backbone, frames, latent side, stride, spatial stride, heads). The default pyramid's stages (16 frames: 4, 8, 16),
# the spatio-temporal one's (the early stages at half the side), Wan's anchored 21 latent frames (6, 11, 21).
# Tokens per clip such as 6x3x3 = 54 or 11x3x3 = 99 split unevenly; 3 heads (DiT) or 2 (Flux, Wan) over 4 ranks
# take the gathered-keys path, the rest Ulysses.
CASES = [("dit", 4, 8, 4, 1, 4), ("dit", 8, 8, 2, 1, 4), ("dit", 16, 8, 1, 1, 4), ("dit", 4, 8, 4, 2, 4),
         ("dit", 8, 8, 2, 2, 4), ("dit", 6, 6, 4, 1, 4), ("dit", 11, 6, 2, 1, 3), ("dit", 21, 6, 1, 1, 4),
         ("flux", 4, 8, 4, 1, 2), ("flux", 16, 8, 1, 1, 4), ("flux", 8, 4, 2, 2, 2), ("flux", 11, 6, 2, 1, 2),
         ("wan", 6, 6, 4, 1, 2), ("wan", 11, 6, 2, 1, 4), ("wan", 21, 6, 1, 1, 2), ("wan", 6, 4, 4, 2, 4)]
# The short stages' mode, the group's clips split over it: a batch of world + 1 clips (some ranks one clip more).
BATCH_CASES = [("dit", 8, 8, 2, 1, 4), ("wan", 11, 6, 2, 1, 2)]


def _worker(rank: int, port: int, world: int, out: str) -> None:
    join_gloo_group(rank, port, world)
    import torch.distributed as dist

    from tpdiff_lightning.distributed.context_parallel import (ContextParallel, batch_split_forward,
                                                               sequence_split_forward)

    cp = ContextParallel(dist.group.WORLD, world, rank)
    results = {}
    # one process group for every case: the spawns, not the cases, cost the time
    for key, case, batch, split in [*((c, c, 2, sequence_split_forward) for c in CASES),
                                    *((("batch", *c), c, world + 1, batch_split_forward) for c in BATCH_CASES)]:
        y, grads = run(build(case[0], case[5]), case, batch, lambda *a, **k: split(a[0], cp, *a[1:], **k))
        for g in grads.values():  # the ranks' gradients sum to the clip's (FSDP's reduce-scatter sums them)
            dist.all_reduce(g)
        results[key] = {"y": y, "grads": grads}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def assert_within(got: torch.Tensor, expected: torch.Tensor, name: str, tolerance: float = 1e-5,
                  floor: float = 1e-12) -> None:
    """Equal within ``tolerance`` of the tensor's scale (at least ``floor``): float32 sums over a sequence split in
    parts round in another order (a gradient summed over 400 tokens differs by a few 1e-6 of its largest
    element)."""
    scale = expected.abs().max().clamp_min(floor)
    error = float((got - expected).abs().max() / scale)
    assert error <= tolerance, f"{name}: max difference {error:.2e} of the largest element"


@pytest.fixture(scope="module")
def split_results(tmp_path_factory):
    """Every case's output and gradients with its tokens split over 2 and over 4 processes."""
    results = {}
    for world in (2, 4):
        out = tmp_path_factory.mktemp(f"cp{world}") / "cp.pt"
        mp.start_processes(_worker, args=(free_port(), world, str(out)), nprocs=world, start_method="spawn", join=True)
        results[world] = torch.load(out)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}f{c[2]}px-S{c[3]}-P{c[4]}-h{c[5]}")
def test_a_split_sequence_gives_the_single_process_outputs_and_gradients(split_results, world, case):
    got = split_results[world][case]
    y, grads = run(build(case[0], case[5]), case)
    assert_gradients_within(got, y, grads)


def assert_gradients_within(got: dict, y: torch.Tensor, grads: dict) -> None:
    """The output and every parameter gradient within 1e-5, each against its own scale but at least 1% of the
    largest gradient: a gradient that is zero in exact arithmetic (an attention key's bias: softmax ignores a
    shift shared by every key) is rounding noise, whose size relative to itself means nothing."""
    assert_within(got["y"], y, "output")
    assert set(got["grads"]) == set(grads)
    largest = max(float(g.abs().max()) for g in grads.values())
    for name, grad in grads.items():
        assert_within(got["grads"][name], grad, name, floor=1e-2 * largest)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", BATCH_CASES, ids=lambda c: f"{c[0]}-{c[1]}f{c[2]}px-S{c[3]}")
def test_an_uneven_batch_split_gives_the_single_process_outputs_and_gradients(split_results, world, case):
    got = split_results[world][("batch", *case)]
    y, grads = run(build(case[0], case[5]), case, world + 1)
    assert_gradients_within(got, y, grads)


def test_the_group_splits_clips_that_divide_evenly_and_tokens_that_are_long_or_have_too_few_clips():
    from tpdiff_lightning.distributed.context_parallel import ContextParallel

    cp = ContextParallel(None, 4, 0, min_tokens=1000)
    assert cp.splits_sequence(10, 1) and cp.splits_sequence(10, 3)  # fewer clips than ranks: always the tokens
    assert not cp.splits_sequence(10 ** 6, 4) and not cp.splits_sequence(10 ** 6, 8)  # even: the clips, any length
    assert not cp.splits_sequence(999, 5) and cp.splits_sequence(1000, 5)  # uneven: the tokens from min_tokens on
    assert cp.splits_sequence(1000, 6) and not cp.splits_sequence(999, 7)
