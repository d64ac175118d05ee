"""A tiny random AnimateDiff ``UNetMotionModel`` in diffusers layout, for tests and CPU-sized configs (no download)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def tiny_animatediff_config(in_channels: int = 4, text_dim: int = 32, **overrides: Any) -> dict[str, Any]:
    """Config of a two-level ``UNetMotionModel`` (widths 32 and 64, one layer per block, 2 heads, motion
    modules in every block including the middle one); ``overrides`` replace any key.

    ``motion_max_seq_length=32`` leaves room for 16 frames at stride 2 (positions up to 30).
    """
    config = dict(
        sample_size=16,
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=text_dim,
        num_attention_heads=2,
        motion_num_attention_heads=2,
        motion_max_seq_length=32,
        use_motion_mid_block=True,
    )
    config.update(overrides)
    return config


def save_tiny_animatediff(folder: str | Path, seed: int = 0, **config_kw: Any) -> Path:
    """Save a tiny random ``UNetMotionModel`` under ``folder/"unet"`` (the diffusers pipeline layout) and
    return ``folder``, so a config can name ``folder`` as the pretrained path."""
    from diffusers import UNetMotionModel

    from tests.helpers.tiny_save import save_random_part

    return save_random_part(UNetMotionModel, tiny_animatediff_config(**config_kw), folder, "unet", seed)


def save_tiny_sd_unet_and_adapter(folder: str | Path, seed: int = 0, in_channels: int = 4,
                                  text_dim: int = 32) -> tuple[Path, Path]:
    """Save a tiny SD1.5-style ``UNet2DConditionModel`` under ``folder/"unet"`` and a matching
    ``MotionAdapter`` under ``folder/"motion_adapter"``; returns ``(folder, folder/"motion_adapter")``."""
    from diffusers import MotionAdapter, UNet2DConditionModel

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=in_channels, out_channels=in_channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=text_dim,
        attention_head_dim=2)
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1, motion_norm_num_groups=8,
                            motion_num_attention_heads=2, motion_max_seq_length=32, use_motion_mid_block=True)
    unet.save_pretrained(folder / "unet")
    adapter.save_pretrained(folder / "motion_adapter")
    return folder, folder / "motion_adapter"
