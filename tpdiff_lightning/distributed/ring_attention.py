"""Ring attention: each rank's queries attend over every rank's keys and values while only one other rank's chunk
is held at a time.

The ``W`` ranks of a ring each hold a contiguous chunk of the sequence's keys and values (uneven sizes allowed).
Forward takes ``W`` steps: attend the local queries over the chunk in hand, merge the result into a running output by
its log-sum-exp (the numerically stable online softmax), then pass the chunk on to the next rank (rank ``r`` sends
to ``r + 1`` and receives from ``r - 1``). Backward takes the same walk again: the chunk travels with the gradient
of its keys and values, each rank adds its queries' share to it, and one last step brings every chunk's gradient
home. Only the local queries, one chunk and the output and log-sum-exp are kept for backward, so the keys and values
of the whole sequence are never held at once, in forward or in backward.

Scores are computed blockwise in float32 (or wider) with plain matrix products (queries × one chunk), which runs on every
backend the tests use (gloo on CPU) and on GPU alike. The pass of a chunk is one ``all_to_all_single`` in which each
rank sends to one neighbour only.

A ``prefix`` of tokens held by every rank (a caption in joint attention) is a local block of keys and values: each
rank attends its queries over it, and its gradient on each rank is that rank's queries' share (the same convention as
the rest of the split: replicated tokens' gradients are summed over ranks with the parameters').
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def _pass_on(x: Tensor, group: Any, size: int, rank: int, incoming: int) -> Tensor:
    """Send ``x`` (rows on dim 0) to rank ``rank + 1`` of the ring and return the ``incoming`` rows from ``rank - 1``."""
    if size == 1:
        return x
    send = [0] * size
    receive = [0] * size
    send[(rank + 1) % size] = x.shape[0]
    receive[(rank - 1) % size] = incoming
    out = x.new_empty((incoming, *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), receive, send, group=group)
    return out


def _key_mask(mask: Tensor | None, prefix: int, offsets: list[int], sizes: list[int], chunk: int | None) -> Tensor | None:
    """The columns of a ``(..., prefix + N)`` key mask for the prefix (``chunk`` None) or for chunk ``chunk``."""
    if mask is None or mask.shape[-1] == 1:
        return mask
    if chunk is None:
        return mask[..., :prefix]
    start = prefix + offsets[chunk]
    return mask[..., start:start + sizes[chunk]]


def _wide(x: Tensor) -> Tensor:
    """``x`` in at least float32 (the dtype scores, outputs and gradients accumulate in)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _scores(q: Tensor, k: Tensor, scale: float, mask: Tensor | None) -> Tensor:
    """``q kᵀ · scale`` with the key mask applied (boolean: False is left out; float: added)."""
    s = torch.matmul(_wide(q), _wide(k).transpose(-1, -2)) * scale
    if mask is None:
        return s
    if mask.dtype == torch.bool:
        return s.masked_fill(~mask, float("-inf"))
    return s + _wide(mask)


def _finite(lse: Tensor) -> Tensor:
    """``lse`` with rows that see no key (-inf) set to 0, so that ``exp(s - lse)`` is 0 there, not NaN."""
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


def _merge(out: Tensor, lse: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None):
    """The running ``(out, lse)`` of attention so far merged with attention over the keys ``k`` and values ``v``."""
    s = _scores(q, k, scale, mask)
    block_lse = torch.logsumexp(s, dim=-1)
    block_out = torch.matmul(torch.exp(s - _finite(block_lse)[..., None]), _wide(v))
    new_lse = torch.logaddexp(lse, block_lse)
    safe = _finite(new_lse)
    out = out * torch.exp(lse - safe)[..., None] + block_out * torch.exp(block_lse - safe)[..., None]
    return out, new_lse


def _grads(q: Tensor, k: Tensor, v: Tensor, d_out: Tensor, delta: Tensor, lse: Tensor, scale: float,
           mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients ``(dq, dk, dv)`` (at least float32) of attention restricted to the keys ``k`` and values ``v``."""
    p = torch.exp(_scores(q, k, scale, mask) - _finite(lse)[..., None])  # (B, H, Lq, n) softmax weights
    dv = torch.matmul(p.transpose(-1, -2), d_out)
    ds = p * (torch.matmul(d_out, _wide(v).transpose(-1, -2)) - delta[..., None]) * scale
    return torch.matmul(ds, _wide(k)), torch.matmul(ds.transpose(-1, -2), _wide(q)), dv


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, group: Any, size: int, rank: int,
                sizes: list[int], prefix: int) -> Tensor:
        B, H, Lq, d = q.shape
        scale = d ** -0.5
        offsets = [sum(sizes[:j]) for j in range(size)]
        wide = torch.promote_types(q.dtype, torch.float32)
        out = q.new_zeros((B, H, Lq, v.shape[-1]), dtype=wide)
        lse = q.new_full((B, H, Lq), float("-inf"), dtype=wide)
        if prefix:
            out, lse = _merge(out, lse, q, k[:, :, :prefix], v[:, :, :prefix], scale,
                              _key_mask(mask, prefix, offsets, sizes, None))
        kv = torch.stack([k[:, :, prefix:], v[:, :, prefix:]]).permute(3, 0, 1, 2, 4)  # (n, 2, B, H, d): rows first
        for step in range(size):
            chunk = (rank - step) % size
            out, lse = _merge(out, lse, q, kv[:, 0].permute(1, 2, 0, 3), kv[:, 1].permute(1, 2, 0, 3), scale,
                              _key_mask(mask, prefix, offsets, sizes, chunk))
            if step < size - 1:
                kv = _pass_on(kv, group, size, rank, sizes[(chunk - 1) % size])
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.ring = group, size, rank, sizes, prefix, offsets, scale
        return out

    @staticmethod
    def backward(ctx, d_out: Tensor):
        q, k, v, mask, out, lse = ctx.saved_tensors
        group, size, rank, sizes, prefix, offsets, scale = ctx.ring
        d_out = _wide(d_out)
        delta = (d_out * _wide(out)).sum(-1)  # (B, H, Lq): rowsum(dO ∘ O)
        dq = torch.zeros(q.shape, dtype=d_out.dtype, device=q.device)
        dk_prefix = dv_prefix = None
        if prefix:
            g_q, dk_prefix, dv_prefix = _grads(q, k[:, :, :prefix], v[:, :, :prefix], d_out, delta, lse, scale,
                                               _key_mask(mask, prefix, offsets, sizes, None))
            dq = dq + g_q
        kv = torch.stack([k[:, :, prefix:], v[:, :, prefix:]]).permute(3, 0, 1, 2, 4)  # (n, 2, B, H, d)
        d_kv = torch.zeros_like(kv, dtype=d_out.dtype)  # the gradient travelling with the chunk
        for step in range(size):
            chunk = (rank - step) % size
            k_c, v_c = kv[:, 0].permute(1, 2, 0, 3), kv[:, 1].permute(1, 2, 0, 3)
            g_q, g_k, g_v = _grads(q, k_c, v_c, d_out, delta, lse, scale,
                                   _key_mask(mask, prefix, offsets, sizes, chunk))
            dq = dq + g_q
            d_kv = d_kv + torch.stack([g_k, g_v]).permute(3, 0, 1, 2, 4)
            incoming = sizes[(chunk - 1) % size]
            if step < size - 1:
                kv = _pass_on(kv, group, size, rank, incoming)
            d_kv = _pass_on(d_kv, group, size, rank, incoming)  # the last pass brings every chunk's gradient home
        d_kv = d_kv.permute(1, 2, 3, 0, 4)  # (2, B, H, n, d)
        dk, dv = d_kv[0], d_kv[1]
        if prefix:
            dk, dv = torch.cat([dk_prefix, dk], dim=2), torch.cat([dv_prefix, dv], dim=2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def ring_attention(q: Tensor, k: Tensor, v: Tensor, group: Any, size: int, rank: int, sizes: list[int],
                   prefix: int = 0, mask: Tensor | None = None) -> Tensor:
    """Attention of the local queries ``q (B, H, Lq, d)`` over the ``prefix`` keys and values held by every rank
    (``k, v[:, :, :prefix]``) and every ring rank's chunk (``k, v[:, :, prefix:]`` here, ``sizes[j]`` tokens on rank
    ``j``), in order; ``mask`` a key mask broadcastable to ``(B, H, Lq, prefix + sum(sizes))`` (boolean: False is
    left out), as ``scaled_dot_product_attention`` takes it."""
    return _RingAttention.apply(q, k, v, mask, group, size, rank, list(sizes), prefix)
