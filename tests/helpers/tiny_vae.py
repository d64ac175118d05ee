"""Tiny random VAEs saved in diffusers pipeline layout (``<folder>/vae``), so tests load them by path."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4, sample_size=32,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[8, 8, 16, 16],  # four levels: 8x spatial compression, as SD1.5
    scaling_factor=0.18215,
)

TINY_WAN_VAE = dict(
    base_dim=4, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],  # bf16 conv3d on CPU is slow
    temperal_downsample=[False, True, True],  # 4x temporal, 8x spatial, as Wan2.1
    latents_mean=[0.3, -0.2, 0.1, -0.4], latents_std=[1.5, 0.5, 2.0, 0.8],
)


def tiny_sd_vae(seed: int = 0, **overrides):
    """A random ``AutoencoderKL`` with the tiny config (plus ``overrides``)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL.from_config({**TINY_SD_VAE, **overrides}).eval()


def tiny_wan_vae(seed: int = 0, **overrides):
    """A random ``AutoencoderKLWan`` with the tiny config (plus ``overrides``)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan.from_config({**TINY_WAN_VAE, **overrides}).eval()


def save_tiny_sd_vae(folder: str | Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny SD VAE under ``folder/vae``; returns ``folder`` (a pipeline-layout root)."""
    folder = Path(folder)
    tiny_sd_vae(seed, **overrides).save_pretrained(folder / "vae")
    return folder


def save_tiny_wan_vae(folder: str | Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny Wan VAE under ``folder/vae``; returns ``folder`` (a pipeline-layout root)."""
    folder = Path(folder)
    tiny_wan_vae(seed, **overrides).save_pretrained(folder / "vae")
    return folder
