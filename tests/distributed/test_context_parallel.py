"""Context parallelism on gloo: a clip's tokens over 2 and 4 processes give the single process's outputs and
parameter gradients (float32), for the built-in DiT, the Flux-style DiT and Wan, at the stage shapes of the
shipped pyramids, uneven token counts included, by Ulysses, by ring attention and by Ulysses × ring (heads that the
degree does not divide); and each attention path on its own in float64, masked caption prefix included."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from tests.helpers.gloo import free_port, join_gloo_group
from tpdiff_lightning.distributed.context_parallel import shard_bounds

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
# Tokens per clip such as 6x3x3 = 54 or 11x3x3 = 99 split unevenly; 3 heads (DiT) over 2 or 4 ranks take ring
# attention, 2 heads (Flux, Wan) over 4 ranks Ulysses over pairs × a ring of 2, the rest Ulysses.
CASES = [("dit", 4, 8, 4, 1, 4), ("dit", 8, 8, 2, 1, 4), ("dit", 16, 8, 1, 1, 4), ("dit", 4, 8, 4, 2, 4),
         ("dit", 8, 8, 2, 2, 4), ("dit", 6, 6, 4, 1, 4), ("dit", 11, 6, 2, 1, 3), ("dit", 21, 6, 1, 1, 4),
         ("flux", 4, 8, 4, 1, 2), ("flux", 16, 8, 1, 1, 4), ("flux", 8, 4, 2, 2, 2), ("flux", 11, 6, 2, 1, 2),
         ("wan", 6, 6, 4, 1, 2), ("wan", 11, 6, 2, 1, 4), ("wan", 21, 6, 1, 1, 2), ("wan", 6, 4, 4, 2, 4)]
# The short stages' mode, the group's clips split over it: a batch of world + 1 clips (some ranks one clip more).
BATCH_CASES = [("dit", 8, 8, 2, 1, 4), ("wan", 11, 6, 2, 1, 2)]


def _worker(rank: int, port: int, world: int, out: str) -> None:
    join_gloo_group(rank, port, world)
    import torch.distributed as dist

    from tpdiff_lightning.distributed.context_parallel import (
        ContextParallel, batch_split_forward, build_subgroups,
        sequence_split_forward)

    cp = ContextParallel(dist.group.WORLD, world, rank, subgroups=build_subgroups([list(range(world))], rank))
    torch.save(attention_paths(cp), f"{out}.attention{rank}")
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


# Attention alone, float64: (heads, caption prefix, tokens). 13 and 7 tokens split unevenly over 2 and 4 ranks.
ATTENTION_CASES = [(2, 0, 13), (3, 0, 13), (4, 3, 13), (6, 3, 7)]
PATHS = ("ulysses", "ring", "gathered", "auto")


def attention_inputs(heads: int, prefix: int, tokens: int):
    """Queries, keys and values ``(2, heads, prefix + tokens, 8)``, a key mask hiding caption padding in clip 0, and
    the weights of the loss ``Σ w·out``."""
    g = torch.Generator().manual_seed(heads * 100 + tokens)
    q, k, v = (torch.randn(2, heads, prefix + tokens, 8, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(2, 1, 1, prefix + tokens, dtype=torch.bool)
    mask[0, ..., prefix - 1:prefix] = False  # the caption's last token is padding in clip 0 (nothing if no prefix)
    return q, k, v, mask, torch.randn(2, heads, prefix + tokens, 8, generator=g, dtype=torch.float64)


def attention_paths(cp) -> dict:
    """This rank's share of each path's output and of the gradients of its queries, keys and values."""
    from dataclasses import replace

    from tpdiff_lightning.distributed.context_parallel import (attention,
                                                               shard_sizes)

    results = {}
    for heads, prefix, tokens in ATTENTION_CASES:
        q, k, v, mask, w = attention_inputs(heads, prefix, tokens)
        start, end = shard_bounds(tokens, cp.size, cp.rank)
        mine = [*range(prefix), *range(prefix + start, prefix + end)]
        for path in PATHS:
            if path == "ulysses" and heads % cp.size:
                continue
            local = [x[:, :, mine].clone().requires_grad_() for x in (q, k, v)]
            out = attention(*local, replace(cp, attention=path), shard_sizes(tokens, cp.size),
                            prefix, mask)
            weight = w[:, :, mine].clone()
            if cp.rank:  # the caption's outputs are the same on every rank: one rank's loss counts them
                weight[:, :, :prefix] = 0
            (out * weight).sum().backward()
            results[heads, prefix, tokens, path] = (out.detach(), *(x.grad for x in local))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: f"h{c[0]}-prefix{c[1]}-n{c[2]}")
def test_every_attention_path_gives_the_single_process_attention_and_gradients(split_results, world, case):
    """Ulysses, ring, gathered keys and values and the automatic choice (Ulysses × ring for 2 or 6 heads over 4
    ranks, ring for 3 heads) equal one process's attention in float64: each rank's share of the output and
    of the query, key and value gradients, the caption's summed over ranks (its copies are every rank's)."""
    heads, prefix, tokens = case
    q, k, v, mask, w = attention_inputs(heads, prefix, tokens)
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    expected = torch.nn.functional.scaled_dot_product_attention(*full, attn_mask=mask)
    (expected * w).sum().backward()
    ranks = split_results[world]["attention"]
    for path in PATHS:
        if path == "ulysses" and heads % world:
            continue
        summed_prefix = [0, 0, 0]
        for rank, got in enumerate(ranks):
            out, *grads = got[heads, prefix, tokens, path]
            start, end = shard_bounds(tokens, world, rank)
            torch.testing.assert_close(out[:, :, :prefix], expected[:, :, :prefix].detach(), rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(out[:, :, prefix:], expected[:, :, prefix + start:prefix + end].detach(),
                                       rtol=1e-10, atol=1e-10, msg=lambda m: f"{path}: {m}")
            for i, (grad, reference) in enumerate(zip(grads, full)):
                torch.testing.assert_close(grad[:, :, prefix:], reference.grad[:, :, prefix + start:prefix + end],
                                           rtol=1e-10, atol=1e-10, msg=lambda m: f"{path} grad {i}: {m}")
                summed_prefix[i] = summed_prefix[i] + grad[:, :, :prefix]
        for i, reference in enumerate(full):
            torch.testing.assert_close(summed_prefix[i], reference.grad[:, :, :prefix], rtol=1e-10, atol=1e-10)


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
        for attempt in range(2):  # a fresh port once: free_port's port can be taken by another test's group first
            try:
                mp.start_processes(_worker, args=(free_port(), world, str(out)), nprocs=world, start_method="spawn",
                                   join=True)
                break
            except mp.ProcessExitedException:
                if attempt == 1:
                    raise
        results[world] = torch.load(out)
        results[world]["attention"] = [torch.load(f"{out}.attention{r}") for r in range(world)]
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


def test_the_automatic_path_is_ulysses_where_the_degree_divides_the_heads_else_ulysses_by_ring_or_ring():
    from tpdiff_lightning.distributed.context_parallel import ContextParallel, attention_path

    hybrid = {2: (None, None), 4: (None, None)}  # the factors of 8 with their (Ulysses, ring) groups
    eight = ContextParallel(None, 8, 0, subgroups=hybrid)
    assert attention_path(eight, 16) == "ulysses"
    assert attention_path(eight, 12) == "ulysses-ring"  # Wan 1.3B, DiT-B: Ulysses over 4 × a ring of 2
    assert attention_path(eight, 6) == "ulysses-ring"  # Ulysses over 2 × a ring of 4
    assert attention_path(eight, 3) == "ring"
    assert attention_path(ContextParallel(None, 8, 0, attention="gathered", subgroups=hybrid), 12) == "gathered"
    assert attention_path(ContextParallel(None, 8, 0, attention="ring", subgroups=hybrid), 16) == "ring"
    with pytest.raises(ValueError, match=r"context_parallel_attention='ulysses' needs the degree 8 to divide .* 12"):
        attention_path(ContextParallel(None, 8, 0, attention="ulysses"), 12)


def test_a_bad_attention_setting_is_one_line_naming_the_key():
    from types import SimpleNamespace

    from tpdiff_lightning.distributed.fsdp2 import FSDP2Strategy
    from tpdiff_lightning.models.dit import VideoDiT
    from tpdiff_lightning.training.fit_checks import context_parallel_problems

    with pytest.raises(ValueError, match=r"^trainer.strategy.init_args.context_parallel_attention='flash' is invalid; "
                                         r"expected one of auto, ulysses, ring, gathered$"):
        FSDP2Strategy(context_parallel_size=2, context_parallel_attention="flash")
    strategy = FSDP2Strategy(context_parallel_size=4, context_parallel_attention="ulysses")
    assert strategy.context_parallel_attention == "ulysses"
    strategy = SimpleNamespace(context_parallel_size=4, context_parallel_attention="ulysses", num_nodes=1,
                               num_processes=4)  # as the strategy reads after the processes started

    class Module:  # the fit check reads only the backbone
        backbone = VideoDiT(3, 8, size="dit-nano")  # 2 heads

    problems = context_parallel_problems(strategy, Module())
    assert problems == ["trainer.strategy.init_args.context_parallel_attention='ulysses' needs the degree 4 to "
                        "divide the backbone's attention heads (2); expected auto, ring or gathered"]
    strategy.context_parallel_attention = "auto"
    assert context_parallel_problems(strategy, Module()) == []


def test_subgroups_pair_neighbours_for_ulysses_and_the_same_place_of_each_pair_for_the_ring(monkeypatch):
    """16 ranks in context-parallel groups of 8: every rank builds every subgroup (collectively), keeping its own
    Ulysses group of neighbours and the ring through the same place of the other Ulysses groups."""
    import torch.distributed as dist

    from tpdiff_lightning.distributed.context_parallel import build_subgroups

    made = []
    monkeypatch.setattr(dist, "new_group", lambda members: made.append(tuple(members)) or tuple(members))
    groups = [list(range(8)), list(range(8, 16))]
    subgroups = build_subgroups(groups, 13)
    assert set(subgroups) == {2, 4}
    ulysses, ring = subgroups[4]
    assert (ulysses.group, ulysses.size, ulysses.rank) == ((12, 13, 14, 15), 4, 1)
    assert (ring.group, ring.size, ring.rank) == ((9, 13), 2, 1)
    ulysses, ring = subgroups[2]
    assert (ulysses.group, ulysses.rank) == ((12, 13), 1) and (ring.group, ring.rank) == ((9, 11, 13, 15), 2)
    assert len(made) == 2 * (4 + 2 + 2 + 4) and build_subgroups(groups, 0) and len(made) == 4 * 12  # all, each time
