"""The built-in video DiT: spatial patches per frame, full 3D self-attention with stage-consistent RoPE.

Notation: B batch, C channels, F frames (of the current stage), H, W pixels, p patch size,
h = H/p, w = W/p, N = F·h·w tokens, D hidden size, L text tokens, S the stage's temporal stride,
P its spatial stride (spatio-temporal pyramid).
Patches are spatial only (temporal patch 1), so the model takes any frame count: a low-frame-rate
stage really is a shorter sequence, and the stride only changes the temporal RoPE positions (Eq. 14).
Likewise a stage at ``H/P x W/P`` latents is a smaller token grid whose rows and columns sit at
``a·P`` of the full-resolution grid (or at ``(a + ½)·P − ½`` with ``spatial_positions="centre"``).
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tpdiff_lightning.models.embeddings import CaptionPoolEmbedder, TimestepEmbedder
from tpdiff_lightning.models.rope import SPATIAL_POSITIONS, RoPE3D, rotate, temporal_positions
from tpdiff_lightning.models.token_split import TokenSplit, TokenSplitFactory


@dataclass(frozen=True)
class DiTSize:
    """Architecture of one named DiT size."""

    hidden: int
    """Token width D."""
    depth: int
    """Number of transformer blocks."""
    heads: int
    """Attention heads; `hidden / heads` must be even and at least 6 for the 3D RoPE."""
    patch: int
    """Default spatial patch size p."""
    mlp_ratio: float = 4.0
    """MLP width as a multiple of D."""


DIT_SIZES: dict[str, DiTSize] = {
    "dit-nano": DiTSize(hidden=32, depth=1, heads=2, patch=8, mlp_ratio=2.0),  # test fixtures: a few hundred KB
    "dit-tiny": DiTSize(hidden=128, depth=4, heads=4, patch=8, mlp_ratio=4.0),
    "dit-s": DiTSize(hidden=384, depth=12, heads=6, patch=2),
    "dit-b": DiTSize(hidden=768, depth=12, heads=12, patch=2),
    "dit-l": DiTSize(hidden=1024, depth=24, heads=16, patch=2),
}


# Options of the opt-in compiled forward. Static shapes: one graph per stage shape (K stages, K graphs), built on
# the stage's first step and reused afterwards, never a dynamic-shape graph or a recompile per step.
COMPILE_OPTIONS: dict[str, Any] = {"dynamic": False}


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation of tokens `x (B, N, D)` by per-sample `shift, scale (B, D)`."""
    return x * (1 + scale[:, None]) + shift[:, None]


class SelfAttention(nn.Module):
    """Full multi-head self-attention over all F·h·w tokens, with 3D RoPE on q and k."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, split: TokenSplit | None = None) -> Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, D // self.heads)  # (B, N, 3, heads, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, heads, N, d) each
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if split is None:
            out = nnf.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        else:  # N is this rank's share of the tokens; attention reaches every rank's
            out = split.attention(q, k, v)  # (B, heads, N, d)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class CrossAttention(nn.Module):
    """Attention from video tokens to the caption tokens that `text_mask` marks as real."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        B, N, D = x.shape
        L = text.shape[1]
        q = self.q(x).view(B, N, self.heads, D // self.heads).transpose(1, 2)  # (B, heads, N, d)
        kv = self.kv(text).view(B, L, 2, self.heads, D // self.heads)  # (B, L, 2, heads, d)
        k, v = kv.permute(2, 0, 3, 1, 4)  # (B, heads, L, d) each
        # A caption with no real token would give a softmax over nothing (NaN): let it attend to
        # everything, then zero its output so it contributes no text at all.
        has_text = text_mask.any(dim=1)  # (B,)
        attend = (text_mask | ~has_text[:, None])[:, None, None, :]  # (B, 1, 1, L)
        out = nnf.scaled_dot_product_attention(q, k, v, attn_mask=attend)  # (B, heads, N, d)
        out = out * has_text[:, None, None, None].to(out.dtype)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention, then cross-attention to the caption, then an adaLN-Zero GELU MLP."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden, heads)
        self.norm_cross = nn.LayerNorm(hidden, eps=1e-6)
        self.cross = CrossAttention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden)
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: Tensor, c: Tensor, text: Tensor, text_mask: Tensor, cos: Tensor, sin: Tensor,
                split: TokenSplit | None = None) -> Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=-1)  # (B, D) each
        x = x + gate_a[:, None] * self.attn(modulate(self.norm1(x), shift_a, scale_a), cos, sin, split)  # (B, N, D)
        x = x + self.cross(self.norm_cross(x), text, text_mask)  # (B, N, D)
        x = x + gate_m[:, None] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))  # (B, N, D)
        return x


class FinalLayer(nn.Module):
    """adaLN then a linear map from each token to its p·p·C patch pixels."""

    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # (B, D) each
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, p*p*C)


class PixelSkip(nn.Module):
    """A per-pixel gain, set by the conditioning, on the input patch added to the output patch.

    When the hidden width is below the patch size (p·p·C values), tokens cannot carry per-pixel noise;
    the velocity and noise targets are largely ``gain(t) * x_t`` plus smooth content, so this path
    gives the network that identity part directly. Zero-initialised, so it starts switched off.
    """

    def __init__(self, hidden: int, patch_dim: int):
        super().__init__()
        self.gain = nn.Sequential(nn.SiLU(), nn.Linear(hidden, patch_dim))

    def forward(self, patches: Tensor, c: Tensor) -> Tensor:
        return self.gain(c)[:, None] * patches  # (B, N, p*p*C)


class VideoDiT(nn.Module):
    """Video diffusion transformer on `(B, C, F, H, W)` with adaLN-Zero timestep/caption conditioning.

    `in_channels` and `text_dim` come first so that a module can build it as `backbone(in_channels, text_dim)`.

    Args:
        in_channels: channels of the (latent) video; filled in by the module from its codec.
        text_dim: width of the text tokens; filled in by the module from its text encoder.
        size: a name from `DIT_SIZES` ("dit-tiny" for CPU, "dit-s", "dit-b", "dit-l" for GPUs).
        patch_size: spatial patch side (temporal patch is 1); default the size's own.
        caption_pooling: add the pooled caption to the adaLN conditioning (fast caption learning).
        gradient_checkpointing: recompute each block in the backward pass to save memory.
        compile: run the forward pass through ``torch.compile`` (static shapes): one graph per stage shape,
            built on the stage's first step. The weights and the checkpoint keys are unchanged. On the 2-core CPU
            each graph took about 20 CPU seconds (2.5 to 3.5 minutes of wall clock under load) to build and the
            step got 8-13% faster (docs/benchmarks.md); sampling with another batch size builds more graphs. Every
            distinct input shape is a graph (stages x training/sampling batch sizes); past torch's recompile
            limit (``torch._dynamo.config.recompile_limit``, 8 by default) further shapes run uncompiled.
        pixel_skip: per-pixel conditioned skip from input to output patch; default on only when
            the hidden width is below the patch's pixel count (see `PixelSkip`).
        spatial_positions: where the tokens of a stage with spatial stride P sit on the full-resolution token
            grid: `"corner"` (default, `a·P`) or `"centre"` (`(a + ½)·P − ½`). No effect at P = 1.
        absolute_positions: also add a fixed sin-cos embedding of each token's (frame, row, column) position to
            its patch embedding, at the same stage-consistent positions as the RoPE (`j·S`, `a·P`), so a token
            knows where and when it is, not only its offsets to others; without it (the default) positions
            enter through the RoPE alone.
    """

    token_split: TokenSplitFactory | None = None
    """Set for a forward pass under context parallelism (``TPDiffModule``): the tokens' split over the group."""

    def __init__(
        self,
        in_channels: int,
        text_dim: int,
        size: str = "dit-tiny",
        patch_size: int | None = None,
        caption_pooling: bool = True,
        gradient_checkpointing: bool = False,
        pixel_skip: bool | None = None,
        spatial_positions: str = "corner",
        compile: bool = False,
        absolute_positions: bool = False,
    ):
        super().__init__()
        if spatial_positions not in SPATIAL_POSITIONS:
            raise ValueError(f"spatial_positions={spatial_positions!r} is invalid; expected one of {list(SPATIAL_POSITIONS)}")
        self.spatial_positions = spatial_positions
        if size not in DIT_SIZES:
            raise ValueError(f"unknown DiT size {size!r}; expected one of {sorted(DIT_SIZES)}")
        cfg = DIT_SIZES[size]
        if cfg.hidden % cfg.heads != 0:
            raise ValueError(f"size {size!r}: hidden={cfg.hidden} is not divisible by heads={cfg.heads}")
        self.in_channels = in_channels
        self.text_dim = text_dim
        self.size = size
        self.patch_size = patch_size or cfg.patch
        self.gradient_checkpointing = gradient_checkpointing
        if not isinstance(compile, bool):
            raise ValueError(f"compile={compile!r} is invalid; expected true or false")
        self.compile = compile
        D, p = cfg.hidden, self.patch_size

        self.patch_embed = nn.Linear(in_channels * p * p, D)
        self.t_embedder = TimestepEmbedder(D)
        self.caption_pool = CaptionPoolEmbedder(text_dim, D) if caption_pooling else None
        self.text_proj = nn.Sequential(nn.Linear(text_dim, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))
        self.rope = RoPE3D(D // cfg.heads)
        if not isinstance(absolute_positions, bool):
            raise ValueError(f"absolute_positions={absolute_positions!r} is invalid; expected true or false")
        self.absolute_positions = RoPE3D(D) if absolute_positions else None  # the angles of a D-wide table
        self.blocks = nn.ModuleList(DiTBlock(D, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(D, p, in_channels)
        patch_dim = in_channels * p * p
        # By default only where the tokens are too narrow to carry every pixel of a patch.
        use_skip = patch_dim > D if pixel_skip is None else pixel_skip
        self.pixel_skip = PixelSkip(D, patch_dim) if use_skip else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier linears, N(0, 0.02) embedding MLPs, and zeroed adaLN and output layers (adaLN-Zero, as in DiT)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        embed_mlps = [self.t_embedder.mlp] + ([self.caption_pool.mlp] if self.caption_pool is not None else [])
        for mlp in embed_mlps:
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.normal_(mlp[2].weight, std=0.02)
        for layer in [*self.blocks, self.final_layer]:
            nn.init.zeros_(layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        if self.pixel_skip is not None:
            nn.init.zeros_(self.pixel_skip.gain[-1].weight)
            nn.init.zeros_(self.pixel_skip.gain[-1].bias)

    def temporal_positions(self, num_frames: int, stride: int) -> Tensor:
        """Temporal RoPE positions `j·S` of the F frames of a stage with stride S (SPEC, Eq. 14)."""
        return temporal_positions(num_frames, stride)

    def position_embedding(self, F: int, h: int, w: int, stride: int, spatial_stride: int, device) -> Tensor:
        """The fixed sin-cos embedding `(F·h·w, D)` of the tokens' (frame, row, column) positions."""
        cos, sin = self.absolute_positions(F, h, w, stride, device, spatial_stride, self.spatial_positions)
        return torch.cat([cos, sin], dim=-1)

    def patchify(self, x: Tensor) -> Tensor:
        """Cut each frame of `x (B, C, F, H, W)` into p×p patches: tokens `(B, F·h·w, C·p·p)`."""
        B, C, F, H, W = x.shape
        p = self.patch_size
        x = x.view(B, C, F, H // p, p, W // p, p)  # (B, C, F, h, p, w, p)
        x = x.permute(0, 2, 3, 5, 1, 4, 6)  # (B, F, h, w, C, p, p)
        return x.reshape(B, F * (H // p) * (W // p), C * p * p)  # (B, N, C*p*p)

    def unpatchify(self, x: Tensor, F: int, h: int, w: int) -> Tensor:
        """Inverse of `patchify`: tokens `(B, N, C·p·p)` back to `(B, C, F, H, W)`."""
        B, p, C = x.shape[0], self.patch_size, self.in_channels
        x = x.view(B, F, h, w, C, p, p)  # (B, F, h, w, C, p, p)
        x = x.permute(0, 4, 1, 2, 5, 3, 6)  # (B, C, F, h, p, w, p)
        return x.reshape(B, C, F, h * p, w * p)  # (B, C, F, H, W)

    def _check_inputs(self, x: Tensor, text: Tensor, stride: int, spatial_stride: int = 1) -> None:
        if x.ndim != 5:
            raise ValueError(f"expected x of shape (B, C, F, H, W), got shape {tuple(x.shape)}")
        B, C, F, H, W = x.shape
        p = self.patch_size
        if C != self.in_channels:
            raise ValueError(f"expected {self.in_channels} channels, got x of shape {tuple(x.shape)}")
        if H % p or W % p:
            raise ValueError(f"H={H} and W={W} must both be divisible by patch_size={p}")
        if text.ndim != 3 or text.shape[0] != B or text.shape[2] != self.text_dim:
            raise ValueError(f"expected text of shape ({B}, L, {self.text_dim}), got {tuple(text.shape)}")
        if stride < 1:
            raise ValueError(f"stride must be a positive int, got stride={stride}")
        if spatial_stride < 1:
            raise ValueError(f"spatial_stride must be a positive int, got spatial_stride={spatial_stride}")

    def forward(self, x: Tensor, t: Tensor, text: Tensor, text_mask: Tensor | None = None, stride: int = 1,
                spatial_stride: int = 1) -> Tensor:
        """Predict the target for `x (B, C, F, H, W)` at timesteps `t (B,)` in [0, 1000], given captions
        `text (B, L, text_dim)` with `text_mask (B, L)` (True = real token); the output has the shape of x.
        `stride` and `spatial_stride` are the stage's S and P (positions `j·S` and `a·P`)."""
        self._check_inputs(x, text, stride, spatial_stride)
        if text_mask is None:
            text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        text_mask = text_mask.bool()
        if self.compile and self.token_split is None:  # the compiled graph is built without collectives
            return self.compiled_forward()(x, t, text, text_mask, stride, spatial_stride)
        return self.forward_checked(x, t, text, text_mask, stride, spatial_stride)

    def compiled_forward(self):
        """``forward_checked`` through ``torch.compile`` with ``COMPILE_OPTIONS``, built once per model (not
        registered as a submodule, so the state dict keeps its keys)."""
        owner, compiled = self.__dict__.get("_compiled_forward", (None, None))
        if owner != id(self):  # none yet, or copied from another model (a deep copy must not run the original)
            compiled = torch.compile(self.forward_checked, **COMPILE_OPTIONS)
            self.__dict__["_compiled_forward"] = (id(self), compiled)
        return compiled

    def forward_checked(self, x: Tensor, t: Tensor, text: Tensor, text_mask: Tensor, stride: int,
                        spatial_stride: int = 1) -> Tensor:
        """The forward pass on checked inputs (``text_mask`` given, boolean)."""
        B, C, F, H, W = x.shape
        h, w = H // self.patch_size, W // self.patch_size
        patches = self.patchify(x)  # (B, N, C*p*p)
        tokens = self.patch_embed(patches)  # (B, N, D)
        if self.absolute_positions is not None:
            tokens = tokens + self.position_embedding(F, h, w, stride, spatial_stride, x.device).to(tokens.dtype)
        c = self.t_embedder(t)  # (B, D)
        if self.caption_pool is not None:
            c = c + self.caption_pool(text, text_mask)  # (B, D)
        ctx = self.text_proj(text)  # (B, L, D)
        cos, sin = self.rope(F, h, w, stride, x.device, spatial_stride, self.spatial_positions)  # (N, d/2) each
        split = self.token_split(tokens.shape[1]) if self.token_split is not None else None
        if split is not None:  # context parallelism: this rank keeps its share of the tokens from here on
            tokens, patches = split.shard(tokens), split.shard(patches)  # (B, N_r, D), (B, N_r, C*p*p)
            cos, sin = split.shard(cos, dim=0), split.shard(sin, dim=0)  # (N_r, d/2) each

        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, c, ctx, text_mask, cos, sin, split, use_reentrant=False)
            else:
                tokens = block(tokens, c, ctx, text_mask, cos, sin, split)  # (B, N, D)
        out = self.final_layer(tokens, c)  # (B, N, p*p*C)
        if self.pixel_skip is not None:
            out = out + self.pixel_skip(patches, c)  # (B, N, p*p*C)
        if split is not None:
            out = split.gather(out)  # (B, N, p*p*C): every rank's share
        return self.unpatchify(out, F, h, w)  # (B, C, F, H, W)
