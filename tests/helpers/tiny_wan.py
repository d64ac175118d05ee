"""A tiny random Wan2.1 transformer in diffusers layout, for tests and CPU-sized configs (no download)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tiny_wan_config(in_channels: int = 4, text_dim: int = 32, **overrides: Any) -> dict[str, Any]:
    """Config of a 2-layer, 2-head (head dim 12) ``WanTransformer3DModel``; ``overrides`` replace any key.

    Head dim 12 splits into temporal/height/width rotary parts of 4 each, so every axis is rotated.
    """
    config = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=in_channels,
        out_channels=in_channels,
        text_dim=text_dim,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=64,
    )
    config.update(overrides)
    return config


def save_tiny_wan(folder: str | Path, seed: int = 0, **config_kw: Any) -> Path:
    """Save a tiny random Wan transformer under ``folder/"transformer"`` (the diffusers pipeline layout)
    and return ``folder``, so a config can name ``folder`` as the pretrained path."""
    from diffusers import WanTransformer3DModel

    from tests.helpers.tiny_save import save_random_part

    return save_random_part(WanTransformer3DModel, tiny_wan_config(**config_kw), folder, "transformer", seed)
