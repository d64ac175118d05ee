"""A tiny random Flux transformer in diffusers layout, for tests and CPU-sized configs (no download)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tiny_flux_config(in_channels: int = 4, text_dim: int = 32, **overrides: Any) -> dict[str, Any]:
    """Config of a ``FluxTransformer2DModel`` with one double-stream and one single-stream block, 2 heads of
    width 16; ``overrides`` replace any key.

    ``in_channels`` counts latent channels; the model gets ``4·in_channels`` (2×2 packing). The head width
    16 splits into rope axes (frame, row, col) of 4, 6 and 6.
    """
    config = dict(
        patch_size=1,
        in_channels=4 * in_channels,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_dim,
        pooled_projection_dim=text_dim,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )
    config.update(overrides)
    return config


def save_tiny_flux(folder: str | Path, seed: int = 0, **config_kw: Any) -> Path:
    """Save a tiny random Flux transformer under ``folder/"transformer"`` (the diffusers pipeline layout)
    and return ``folder``, so a config can name ``folder`` as the pretrained path."""
    from diffusers import FluxTransformer2DModel

    from tests.helpers.tiny_save import save_random_part

    return save_random_part(FluxTransformer2DModel, tiny_flux_config(**config_kw), folder, "transformer", seed)
