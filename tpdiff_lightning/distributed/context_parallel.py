"""Context parallelism: the tokens of one clip spread over the ranks of a group, which see the same clips.

Each rank of a context-parallel group embeds and transforms only its own contiguous share of the token sequence
(activations fall with the degree); attention is the one place where tokens meet:

- **Ulysses** (when the degree divides the head count): two all-to-alls turn "my tokens, all heads" into "all
  tokens, my heads" and back, so each rank attends over the whole sequence for its share of the heads.
- **Ring** (``ring_attention.py``; when the degree and the head count share no factor, e.g. 4 ranks and 3 heads):
  each rank attends its queries over the chunks of keys and values passed round the group, one at a time.
- **Ulysses × ring** (when they share a factor ``u`` that is not the degree, e.g. 8 ranks and Wan's 12 heads:
  ``u = 4``): Ulysses over groups of ``u`` neighbouring ranks gives each ``H / u`` heads of ``u`` ranks' tokens, and
  a ring over the ``degree / u`` such groups covers the rest of the sequence.
- **Gathered keys and values** (on request, any degree): each rank gathers every rank's keys and values and
  attends its own queries over them (the context parallelism of Llama 3's training). It moves more data than
  Ulysses and holds the full K and V during attention, but is a single exchange.

All are written with ``all_to_all_single``, which NCCL and gloo (the tests' CPU backend) implement with uneven
splits, so a token count that does not divide by the degree is split unevenly, never padded. Public libraries were
checked first: torch's ``context_parallel`` dispatches only GPU attention kernels and assumes causal load
balancing; yunchang's Ulysses needs evenly divisible sequences and its ring path needs flash-attention kernels;
diffusers' ``enable_parallelism`` runs its own process groups and hooks, untested with backward passes and our
stage positions. None runs on the CPU the tests use.

Stage-aware: where the group's batch divides evenly over it, the group splits the *batch* (each rank takes its
share of the clips: the same work and memory as a sequence split, with no attention communication); where it
does not, a stage whose clips hold fewer than ``min_tokens`` tokens takes the uneven batch split, a longer one
the sequence split; with fewer clips than ranks the sequence is always split (``ContextParallel.splits_sequence``,
measured by ``bench/context_parallel.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import gcd
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as nnf
from torch import Tensor, nn

from tpdiff_lightning.distributed.ring_attention import ring_attention

ATTENTION_MODES = ("auto", "ulysses", "ring", "gathered")
"""How a split sequence attends: ``auto`` (Ulysses where the degree divides the heads, Ulysses × ring where they
share a factor, else ring), or one way for every layer."""

DEFAULT_MIN_TOKENS = 1024
"""Tokens per clip from which an uneven batch splits its sequence rather than its clips (bench/context_parallel.py)."""


@dataclass(frozen=True)
class ContextParallel:
    """A context-parallel group as this rank sees it."""

    group: Any
    """The process group of the ranks that share one sequence."""
    size: int
    """Its degree."""
    rank: int
    """This rank's index in it."""
    min_tokens: int = DEFAULT_MIN_TOKENS
    """For a batch that does not divide evenly over the group: tokens per clip from which the sequence is split
    (every rank gets an equal share) rather than the batch (some ranks get one clip more)."""
    attention: str = "auto"
    """One of ``ATTENTION_MODES``."""
    subgroups: Mapping[int, tuple["ContextParallel", "ContextParallel"]] = field(default_factory=dict)
    """For each factor ``u`` of the degree (``1 < u < size``): this rank's Ulysses group of ``u`` neighbouring ranks
    and its ring group of the ``size / u`` ranks at the same place in the other Ulysses groups."""

    def splits_sequence(self, tokens: int, batch: int) -> bool:
        """Whether a batch of ``batch`` clips of ``tokens`` tokens each splits its sequence over the group rather
        than its clips.

        - Fewer clips than ranks: the sequence (there is no batch split that gives every rank work).
        - A batch that divides evenly: the clips. Each rank then computes and holds exactly what a sequence split
          would give it (``batch / size`` clips of ``tokens`` against ``batch`` clips of ``tokens / size``: the
          same tokens, the same attention FLOPs), without the sequence split's attention traffic.
        - Otherwise, the sequence from ``min_tokens`` tokens per clip on: a long stage's extra clip on some ranks
          would idle the others for longer than the all-to-alls take; a short stage's would not.
        """
        if batch < self.size:
            return True
        if batch % self.size == 0:
            return False
        return tokens >= self.min_tokens


def shard_sizes(total: int, parts: int) -> list[int]:
    """``total`` items over ``parts`` ranks as evenly as possible, the first ranks taking one more."""
    return [total // parts + (1 if r < total % parts else 0) for r in range(parts)]


def shard_bounds(total: int, parts: int, rank: int) -> tuple[int, int]:
    """``[start, end)`` of rank ``rank``'s contiguous share of ``total`` items."""
    sizes = shard_sizes(total, parts)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` along dim 0 with uneven splits; its gradient is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x: Tensor, group, send: list[int], receive: list[int]) -> Tensor:
        ctx.group, ctx.send, ctx.receive = group, send, receive
        out = x.new_empty((sum(receive), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), receive, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        back = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), ctx.send, ctx.receive, group=ctx.group)
        return back, None, None, None


def all_to_all(x: Tensor, cp: ContextParallel, send: list[int], receive: list[int]) -> Tensor:
    """Rows ``x[sum(send[:s]):sum(send[:s+1])]`` go to rank s; the rows received from each rank, in rank order."""
    return _AllToAll.apply(x, cp.group, list(send), list(receive))


class _GatherSequence(torch.autograd.Function):
    """Every rank's share of a sequence (dim 1), concatenated in rank order.

    ``shared_loss``: every rank goes on to compute the same thing from the gathered tensor (the model output, whose
    loss every rank of the group evaluates), so each rank's gradient for its share is its own slice. Otherwise
    (keys and values, used by each rank's own queries) the gradients of a share from every rank are summed back to
    its owner.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group, sizes: list[int], rank: int, shared_loss: bool) -> Tensor:
        ctx.group, ctx.sizes, ctx.rank, ctx.shared_loss = group, sizes, rank, shared_loss
        rows = x.movedim(1, 0).contiguous()  # (n_local, B, ...): dim 0 is the one all_to_all_single splits
        out = rows.new_empty((sum(sizes), *rows.shape[1:]))
        dist.all_to_all_single(out, rows.repeat(len(sizes), *([1] * (rows.ndim - 1))), sizes,
                               [rows.shape[0]] * len(sizes), group=group)
        return out.movedim(0, 1)  # (B, N, ...)

    @staticmethod
    def backward(ctx, grad: Tensor):
        start = sum(ctx.sizes[: ctx.rank])
        if ctx.shared_loss:
            return grad[:, start:start + ctx.sizes[ctx.rank]].contiguous(), None, None, None, None
        rows = grad.movedim(1, 0).contiguous()  # (N, B, ...)
        n = ctx.sizes[ctx.rank]
        received = rows.new_empty((n * len(ctx.sizes), *rows.shape[1:]))
        dist.all_to_all_single(received, rows, [n] * len(ctx.sizes), ctx.sizes, group=ctx.group)
        summed = received.view(len(ctx.sizes), n, *rows.shape[1:]).sum(0)  # every rank's gradient of my share
        return summed.movedim(0, 1), None, None, None, None


def gather_sequence(x: Tensor, cp: ContextParallel, sizes: list[int], shared_loss: bool) -> Tensor:
    """``(B, n_rank, ...)`` shares to the whole ``(B, N, ...)`` sequence on every rank (see ``_GatherSequence``)."""
    return _GatherSequence.apply(x, cp.group, list(sizes), cp.rank, shared_loss)


Attend = Callable[[Tensor, Tensor, Tensor], Tensor]


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, cp: ContextParallel, sizes: list[int], attend: Attend,
                      prefix: int = 0) -> Tensor:
    """Attention of ``q, k, v (B, H, prefix + n_rank, d)`` over the whole sequence: the split tokens go by
    all-to-all to ``(B, H / W, N, d)`` (the ``prefix`` tokens, the same on every rank, only lose the other heads),
    ``attend`` runs there, and the results go back to ``(B, H, prefix + n_rank, d)``."""
    B, H, _, d = q.shape
    n = q.shape[2] - prefix
    W = cp.size
    heads = H // W
    mine = slice(cp.rank * heads, (cp.rank + 1) * heads)

    def to_heads(x: Tensor) -> Tensor:
        split = x[:, :, prefix:]  # (B, H, n, d)
        rows = split.reshape(B, W, heads, n, d).permute(1, 0, 2, 3, 4).reshape(W * B * heads * n, d)  # by destination
        full = all_to_all(rows, cp, [B * heads * n] * W, [B * heads * s for s in sizes])
        pieces = full.split([B * heads * s for s in sizes])  # one per source rank, (B, heads, n_s, d) each
        return torch.cat([x[:, mine, :prefix], *(p.view(B, heads, s, d) for p, s in zip(pieces, sizes))], dim=2)

    out = attend(to_heads(q), to_heads(k), to_heads(v))  # (B, H/W, prefix + N, d)
    rows = torch.cat([piece.reshape(-1, d) for piece in out[:, :, prefix:].split(sizes, dim=2)])  # by destination
    back = all_to_all(rows, cp, [B * heads * s for s in sizes], [B * heads * n] * W)
    split = back.view(W, B, heads, n, d).permute(1, 0, 2, 3, 4).reshape(B, H, n, d)  # (B, H, n_rank, d)
    if not prefix:
        return split
    # The prefix's results for every head, on every rank (each rank has only its heads' of them).
    shared = gather_sequence(out[:, :, :prefix], cp, [heads] * W, shared_loss=False)  # (B, H, prefix, d)
    return torch.cat([shared, split], dim=2)


def gathered_kv_attention(q: Tensor, k: Tensor, v: Tensor, cp: ContextParallel, sizes: list[int], attend: Attend,
                          prefix: int = 0) -> Tensor:
    """Attention of the local queries ``q (B, H, prefix + n_rank, d)`` over the prefix and every rank's keys and
    values."""
    def everyone(x: Tensor) -> Tensor:
        split = gather_sequence(x[:, :, prefix:].transpose(1, 2), cp, sizes, shared_loss=False).transpose(1, 2)
        return torch.cat([x[:, :, :prefix], split], dim=2)  # (B, H, prefix + N, d)

    return attend(q, everyone(k), everyone(v))  # (B, H, prefix + n_rank, d)


def attention_path(cp: ContextParallel, heads: int) -> str:
    """How ``cp`` attends with ``heads`` heads: ``ulysses``, ``ulysses-ring``, ``ring`` or ``gathered``."""
    if cp.attention == "ulysses" and heads % cp.size:
        raise ValueError(f"trainer.strategy.init_args.context_parallel_attention='ulysses' needs the degree "
                         f"{cp.size} to divide the backbone's {heads} attention heads; expected 'auto', 'ring' or "
                         "'gathered' for this degree")
    if cp.attention != "auto":
        return cp.attention
    if heads % cp.size == 0:
        return "ulysses"
    return "ulysses-ring" if gcd(heads, cp.size) in cp.subgroups else "ring"


def attention(q: Tensor, k: Tensor, v: Tensor, cp: ContextParallel | None, sizes: list[int] | None,
              prefix: int = 0, mask: Tensor | None = None) -> Tensor:
    """Self-attention of ``(B, H, prefix + n, d)`` tokens, the first ``prefix`` the same on every rank (a caption in
    joint attention), over every rank's tokens, by the path ``attention_path`` picks; ``mask`` is a key mask over the
    prefix and the whole sequence, as ``scaled_dot_product_attention`` takes it."""
    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return nnf.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    if cp is None:
        return attend(q, k, v)
    path = attention_path(cp, q.shape[1])
    if path == "ulysses":
        return ulysses_attention(q, k, v, cp, sizes, attend, prefix)
    if path == "gathered":
        return gathered_kv_attention(q, k, v, cp, sizes, attend, prefix)
    if path == "ring":
        return ring_attention(q, k, v, cp.group, cp.size, cp.rank, sizes, prefix, mask)
    u = gcd(q.shape[1], cp.size)
    ulysses, ring = cp.subgroups[u]  # my u neighbours; the ranks at my place in the other Ulysses groups
    blocks = [sum(sizes[j * u:(j + 1) * u]) for j in range(ring.size)]  # tokens of each Ulysses group

    def ring_over_groups(q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # (B, H / u, prefix + my group's tokens, d)
        return ring_attention(q, k, v, ring.group, ring.size, ring.rank, blocks, prefix, mask)

    return ulysses_attention(q, k, v, ulysses, sizes[ring.rank * u:(ring.rank + 1) * u], ring_over_groups, prefix)


def build_subgroups(groups: Sequence[Sequence[int]], rank: int, min_tokens: int = DEFAULT_MIN_TOKENS
                    ) -> dict[int, tuple[ContextParallel, ContextParallel]]:
    """``ContextParallel.subgroups`` for global rank ``rank``, given the global ranks of every context-parallel group
    (all the same size). Every process must call it, in the same order (``new_group`` is collective)."""
    size = len(groups[0])
    subgroups = {}
    for u in (u for u in range(2, size) if size % u == 0):
        for ranks in groups:
            lines = [list(ranks[j * u:(j + 1) * u]) for j in range(size // u)]  # Ulysses groups: neighbours
            lines += [list(ranks[i::u]) for i in range(u)]  # ring groups: the same place in each Ulysses group
            made = [(members, dist.new_group(members)) for members in lines]
            if rank in ranks:
                mine = [ContextParallel(g, len(m), m.index(rank), min_tokens) for m, g in made if rank in m]
                subgroups[u] = (mine[0], mine[1])
    return subgroups


def split_rows(n: int, cp: ContextParallel) -> slice:
    """This rank's rows of a batch of ``n`` clips split over the group (the short stages' mode)."""
    start, end = shard_bounds(n, cp.size, cp.rank)
    return slice(start, end)


class _GatherRows(torch.autograd.Function):
    """Every rank's rows of a batch (dim 0), concatenated; each rank keeps only its rows' gradient (the callers
    compute the same thing from the gathered batch on every rank)."""

    @staticmethod
    def forward(ctx, x: Tensor, group, sizes: list[int], rank: int) -> Tensor:
        ctx.sizes, ctx.rank = sizes, rank
        out = x.new_empty((sum(sizes), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous().repeat(len(sizes), *([1] * (x.ndim - 1))), sizes,
                               [x.shape[0]] * len(sizes), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]].contiguous(), None, None, None


def gather_rows(x: Tensor, cp: ContextParallel, total: int) -> Tensor:
    """The group's whole batch from each rank's rows (``split_rows``)."""
    return _GatherRows.apply(x, cp.group, shard_sizes(total, cp.size), cp.rank)


def all_reduce_sum(x: Tensor, cp: ContextParallel) -> Tensor:
    """Sum of ``x`` over the group, without a gradient (for logging)."""
    x = x.detach().clone()
    dist.all_reduce(x, group=cp.group)
    return x


class SequenceSplit:
    """One forward pass's token sequence split over the group: a backbone's ``TokenSplit``."""

    def __init__(self, cp: ContextParallel, total: int):
        self.cp, self.sizes = cp, shard_sizes(total, cp.size)
        self.start, self.end = shard_bounds(total, cp.size, cp.rank)

    def shard(self, x: Tensor, dim: int = 1) -> Tensor:
        return x.narrow(dim, self.start, self.end - self.start)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, prefix: int = 0, mask: Tensor | None = None) -> Tensor:
        return attention(q, k, v, self.cp, self.sizes, prefix, mask)

    def gather(self, x: Tensor) -> Tensor:
        return gather_sequence(x, self.cp, self.sizes, shared_loss=True)


def sequence_splits(cp: ContextParallel) -> Callable[[int], SequenceSplit]:
    """The ``token_split`` factory a backbone is given for a forward pass that splits its sequence over ``cp``."""
    return lambda total: SequenceSplit(cp, total)


def sequence_split_forward(backbone: nn.Module, cp: ContextParallel, x: Tensor, t: Tensor, text: Tensor,
                           text_mask: Tensor, **kwargs: Any) -> Tensor:
    """``backbone(x, ...)`` with every clip's tokens split over the group (the backbone's ``token_split``); every
    rank returns the whole output."""
    backbone.token_split = sequence_splits(cp)
    try:
        return backbone(x, t, text, text_mask, **kwargs)
    finally:
        backbone.token_split = None


def batch_split_forward(backbone: nn.Module, cp: ContextParallel, x: Tensor, t: Tensor, text: Tensor,
                        text_mask: Tensor, **kwargs: Any) -> Tensor:
    """``backbone(x, ...)`` with the batch's clips split over the group (each rank runs its share); every rank
    returns the whole output, the gradient of its share flowing back into it only."""
    B = x.shape[0]
    rows = split_rows(B, cp)
    return gather_rows(backbone(x[rows], t.expand(B)[rows], text[rows], text_mask[rows], **kwargs), cp, B)


def split_forward(backbone: nn.Module, cp: ContextParallel, tokens: int, x: Tensor, t: Tensor, text: Tensor,
                  text_mask: Tensor, **kwargs: Any) -> Tensor:
    """``backbone(x, t, text, text_mask, **kwargs)`` for the group's batch ``x`` of clips of ``tokens`` tokens
    each, computed together by the ranks of ``cp``, split by sequence or by batch as ``cp.splits_sequence``
    decides."""
    split = sequence_split_forward if cp.splits_sequence(tokens, x.shape[0]) else batch_split_forward
    return split(backbone, cp, x, t, text, text_mask, **kwargs)
