"""Data-noise alignment over the global batch of all data-parallel ranks (paper Algorithm 1, scaled out).

Per-rank batches are often 1-4 clips, where aligning each rank's slice alone does almost nothing; this
solves one assignment over the concatenated batch of every rank and hands each rank its own rows.

How it stays identical on every rank without trusting floating point to agree across devices:
1. all_gather the noise, ``(B_g, ...)`` with ``B_g = world_size * B``; this is needed anyway, because a
   rank's aligned noise may be a draw made on another rank;
2. each rank computes the cost rows of its own clips against the whole noise, ``(B, B_g)`` in float32;
3. all_gather those rows, so every rank holds the *same bytes* of the ``(B_g, B_g)`` cost matrix;
4. every rank runs scipy's Hungarian solver (deterministic on identical input) on it, and keeps
   its rows of the permuted global noise.
The data never travels, the cost matrix is small (1 MiB at B_g = 512), and no rank waits on a broadcast.
Gradients never flow through noise, so the gathers run without autograd.

Notation: B the local batch, B_g the global batch, r this rank, W the world size.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from tpdiff_lightning.method.alignment import align_noise, alignment_cost, hungarian_permutation

MAX_NDIM = 8


def gather(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Concatenate every rank's ``x (B, ...)`` along the batch, in rank order: ``(W*B, ...)``."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)  # (W*B, ...)


def check_equal_shapes(noise: Tensor, group: dist.ProcessGroup | None) -> None:
    """Raise on every rank, naming each rank's shape, unless all ranks hold noise of one shape."""
    if noise.ndim > MAX_NDIM:
        raise ValueError(f"noise has {noise.ndim} dims; expected at most {MAX_NDIM}")
    shape = torch.full((MAX_NDIM + 1,), -1, dtype=torch.long, device=noise.device)
    shape[0] = noise.ndim
    shape[1:noise.ndim + 1] = torch.tensor(noise.shape, dtype=torch.long)
    shapes = gather(shape[None], group).cpu()  # (W, MAX_NDIM + 1)
    if not (shapes == shapes[0]).all():
        per_rank = [tuple(int(s) for s in row[1:row[0] + 1]) for row in shapes]
        raise ValueError(f"global alignment needs the same local batch shape on every rank; got {per_rank} "
                         "(rank order). Use equal per-rank batch sizes (drop partial batches) or alignment_scope='local'.")


@torch.no_grad()
def align_noise_global(data: Tensor, noise: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """This rank's rows of the global noise, permuted to minimise the data-noise distance over the global batch.

    Args:
        data: this rank's clean latents at the stage's rate, ``(B, C, F_i, H, W)`` (any ``(B, ...)``).
        noise: this rank's noise, same shape.
        group: the data-parallel process group (default the whole world).
    Returns:
        ``(B, ...)`` noise for this rank: rows ``r*B … (r+1)*B - 1`` of the permuted ``(W*B, ...)`` global noise,
        so the ranks together hold every global draw exactly once. Without a process group, or with one
        rank, it is ``align_noise(data, noise)``.
    """
    if data.shape != noise.shape:
        raise ValueError(f"data has shape {tuple(data.shape)} and noise {tuple(noise.shape)}; expected equal shapes")
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return align_noise(data, noise)
    check_equal_shapes(noise, group)
    B, r = noise.shape[0], dist.get_rank(group)
    noise_g = gather(noise, group)  # (B_g, ...)
    cost_rows = alignment_cost(data, noise_g)  # (B, B_g)
    cost = gather(cost_rows, group).cpu().numpy().astype(np.float64)  # (B_g, B_g), the same bytes on every rank
    perm = hungarian_permutation(cost)  # (B_g,)
    mine = torch.from_numpy(perm[r * B:(r + 1) * B]).to(noise.device)  # (B,)
    return noise_g[mine]  # (B, ...)
