"""Conditioning embeddings for the DiT: diffusion timestep and pooled caption."""

import math

import torch
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding `(B, dim)` of float timesteps `t (B,)` on the [0, 1000] scale, as in DiT/ADM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B, dim/2)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*(dim/2))
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)  # (B, dim)
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t followed by a two-layer MLP into the hidden size."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))  # (B, D)


def masked_mean(text: Tensor, text_mask: Tensor) -> Tensor:
    """Mean of `text (B, L, E)` over the real tokens of `text_mask (B, L)`; a row with no real token gives 0."""
    w = text_mask.to(text.dtype)[..., None]  # (B, L, 1)
    return (text * w).sum(1) / w.sum(1).clamp(min=1.0)  # (B, E)


class CaptionPoolEmbedder(nn.Module):
    """MLP of the mask-weighted mean caption token: a global caption signal that is learnt quickly."""

    def __init__(self, text_dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(text_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, text: Tensor, text_mask: Tensor) -> Tensor:
        return self.mlp(masked_mean(text, text_mask))  # (B, D)
