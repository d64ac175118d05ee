"""Pretrained VAE codecs for the paper's backbones: SD1.5's frame-wise ``AutoencoderKL`` and Wan2.1's causal
video VAE ``AutoencoderKLWan``, both frozen and loaded from local diffusers folders.

They follow the codec interface of ``codec.py``: ``encode(video (B, 3, F, H, W) in [-1, 1]) -> latents
(B, C, F', H', W')`` scaled for diffusion, ``decode(latents) -> video in [-1, 1]``, ``latent_frames(F) -> F'``,
and the attributes ``name``, ``latent_channels``, ``temporal_compression``, ``spatial_compression``.

Weights loaded from a folder are kept out of ``state_dict()`` (they are reloaded from the folder, so
checkpoints stay small); a codec built from a bare ``config`` (random weights, for tests) keeps them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tpdiff_lightning.models.weights_folder import config_digest, exclude_frozen_from_state_dict, load_frozen_model


class FrozenVAECodec(nn.Module):
    """Shared parts of the VAE codecs: a frozen ``self.vae`` that stays in eval mode, and input checks."""

    name: str
    latent_channels: int
    temporal_compression: int
    spatial_compression: int
    vae: nn.Module

    def train(self, mode: bool = True) -> "FrozenVAECodec":
        super().train(mode)
        self.vae.eval()  # frozen: no dropout or other training behaviour, whatever the LightningModule does
        return self

    def check_frames(self, num_frames: int) -> None:
        """Raise ValueError unless the VAE accepts clips of ``num_frames`` frames (``1 + T k`` for a causal VAE)."""
        T = self.temporal_compression
        if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % T != 0:
            expected = "at least 1 frame" if T == 1 else (
                f"1 + {T}k frames (1, {1 + T}, {1 + 2 * T}, ...; e.g. {1 + 20 * T} for 21 latent frames)")
            raise ValueError(f"num_frames={num_frames!r} does not fit {self.name}: expected {expected}")

    def latent_frames(self, num_frames: int) -> int:
        """Latent frame count for a clip of ``num_frames`` frames: ``F`` frame-wise, ``(F - 1) / T + 1`` causal."""
        self.check_frames(num_frames)
        return num_frames if self.temporal_compression == 1 else (num_frames - 1) // self.temporal_compression + 1

    def check_video(self, video: Tensor) -> None:
        """Raise ValueError unless ``video`` is ``(B, 3, F, H, W)`` with a frame count and size the VAE accepts."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"expected video of shape (B, 3, F, H, W), got {tuple(video.shape)}")
        self.check_frames(video.shape[2])
        H, W, s = video.shape[3], video.shape[4], self.spatial_compression
        if H % s or W % s:
            raise ValueError(f"video of size {H}x{W} does not fit {self.name}: expected height and width "
                             f"divisible by its spatial compression {s}")

    def check_latents(self, latents: Tensor) -> None:
        """Raise ValueError unless ``latents`` is ``(B, latent_channels, F', H', W')``."""
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents of shape (B, {self.latent_channels}, F, H, W), "
                             f"got {tuple(latents.shape)}")

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def posterior_latents(self, video: Tensor, sample_posterior: bool) -> Tensor:
        """Raw (unscaled) latents of a batch the VAE takes as is: the posterior mean, or a draw from it."""
        dist = self.vae.encode(video.to(self.vae_dtype)).latent_dist
        return (dist.sample() if sample_posterior else dist.mode()).float()


class SDVAECodec(FrozenVAECodec):
    """Stable Diffusion's ``AutoencoderKL``, applied frame by frame: ``F`` frames give ``F`` latent frames at H/8.

    Latents are ``(z - shift_factor) * scaling_factor`` (SD1.5: no shift, factor 0.18215), as diffusers'
    pipelines scale them. Frames of all clips are folded into one batch and go through the VAE ``chunk_size``
    frames at a time, which bounds the activation memory.

    Args:
        pretrained_path: a diffusers pipeline folder (VAE under ``subfolder``) or the VAE's own folder.
        subfolder: the VAE's subfolder in a pipeline folder.
        config: an ``AutoencoderKL`` config for random weights, instead of ``pretrained_path``.
        chunk_size: frames per VAE call.
        sample_posterior: draw latents from the posterior instead of taking its mean.
        tiling: also split large frames into overlapping spatial tiles (diffusers ``enable_tiling``).
        dtype: the VAE's weight dtype.
    """

    temporal_compression = 1

    def __init__(self, pretrained_path: str | None = None, subfolder: str | None = "vae", config: dict | None = None,
                 chunk_size: int = 16, sample_posterior: bool = False, tiling: bool = False, dtype: str = "float32"):
        super().__init__()
        from diffusers import AutoencoderKL

        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} is invalid; expected a positive number of frames")
        self.vae, label = load_frozen_model(AutoencoderKL, pretrained_path, subfolder, config, "SD VAE", dtype)
        if tiling:
            self.vae.enable_tiling()
        cfg = self.vae.config
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(cfg.shift_factor or 0.0)
        self.latent_channels = int(cfg.latent_channels)
        self.spatial_compression = 2 ** (len(cfg.block_out_channels) - 1)
        self.chunk_size, self.sample_posterior = chunk_size, sample_posterior
        self.name = f"sd-vae:{label}:{config_digest(cfg)}"
        if pretrained_path is not None:
            exclude_frozen_from_state_dict(self, "vae")

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """``video (B, 3, F, H, W)`` in [-1, 1] to scaled latents ``(B, C, F, H/8, W/8)``."""
        self.check_video(video)
        B, _, F, H, W = video.shape
        frames = video.transpose(1, 2).reshape(B * F, 3, H, W)  # (B·F, 3, H, W)
        z = torch.cat([self.posterior_latents(chunk, self.sample_posterior)
                       for chunk in frames.split(self.chunk_size)])  # (B·F, C, h, w)
        z = (z - self.shift_factor) * self.scaling_factor
        return z.reshape(B, F, *z.shape[1:]).transpose(1, 2).to(video.dtype)  # (B, C, F, h, w)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents ``(B, C, F, h, w)`` to video ``(B, 3, F, 8h, 8w)`` in [-1, 1]."""
        self.check_latents(latents)
        B, C, F, h, w = latents.shape
        z = latents.float().transpose(1, 2).reshape(B * F, C, h, w)  # (B·F, C, h, w)
        z = z / self.scaling_factor + self.shift_factor
        frames = torch.cat([self.vae.decode(chunk.to(self.vae_dtype)).sample
                            for chunk in z.split(self.chunk_size)])  # (B·F, 3, H, W)
        video = frames.reshape(B, F, *frames.shape[1:]).transpose(1, 2)  # (B, 3, F, H, W)
        return video.clamp(-1, 1).to(latents.dtype)


class WanVAECodec(FrozenVAECodec):
    """Wan's causal video VAE ``AutoencoderKLWan``: ``1 + 4k`` frames give ``1 + k`` latent frames at H/8.

    Latents are normalised per channel with the config's statistics, ``(z - latents_mean) * (1 / latents_std)``,
    the convention of diffusers' Wan pipelines; ``decode`` inverts it. The frame count must be ``1 + 4k``
    (the first frame is encoded alone, hence ``anchor_first_frame=True`` in the pyramid).

    Memory: the VAE itself encodes frame 0 and then 4 frames at a time, carrying a causal cache of each
    convolution's last frames, and decodes one latent frame at a time, so activations grow with the frame
    size, not the clip length. Clips go through ``chunk_size`` at a time, and ``tiling`` splits large frames
    into overlapping spatial tiles (diffusers ``enable_tiling``).

    Args:
        pretrained_path: a diffusers pipeline folder (VAE under ``subfolder``) or the VAE's own folder.
        subfolder: the VAE's subfolder in a pipeline folder.
        config: an ``AutoencoderKLWan`` config for random weights, instead of ``pretrained_path``.
        chunk_size: clips per VAE call.
        sample_posterior: draw latents from the posterior instead of taking its mean.
        tiling: split large frames into overlapping spatial tiles.
        dtype: the VAE's weight dtype.
    """

    def __init__(self, pretrained_path: str | None = None, subfolder: str | None = "vae", config: dict | None = None,
                 chunk_size: int = 1, sample_posterior: bool = False, tiling: bool = False, dtype: str = "float32"):
        super().__init__()
        from diffusers import AutoencoderKLWan

        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} is invalid; expected a positive number of clips")
        self.vae, label = load_frozen_model(AutoencoderKLWan, pretrained_path, subfolder, config, "Wan VAE", dtype)
        if tiling:
            self.vae.enable_tiling()
        cfg = self.vae.config
        self.latent_channels = int(cfg.z_dim)
        for key in ("latents_mean", "latents_std"):
            if len(cfg[key]) != self.latent_channels:
                raise ValueError(f"Wan VAE config has {len(cfg[key])} {key} values; "
                                 f"expected z_dim={self.latent_channels}")
        self.temporal_compression = 2 ** sum(bool(d) for d in cfg.temperal_downsample)
        self.spatial_compression = 2 ** (len(cfg.dim_mult) - 1) * (cfg.patch_size or 1)
        stats_shape = (1, self.latent_channels, 1, 1, 1)
        self.register_buffer("latents_mean", torch.tensor(cfg.latents_mean).view(stats_shape), persistent=False)
        self.register_buffer("latents_std", torch.tensor(cfg.latents_std).view(stats_shape), persistent=False)
        self.chunk_size, self.sample_posterior = chunk_size, sample_posterior
        self.name = f"wan-vae:{label}:{config_digest(cfg)}"
        if pretrained_path is not None:
            exclude_frozen_from_state_dict(self, "vae")

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """``video (B, 3, 1 + 4k, H, W)`` in [-1, 1] to normalised latents ``(B, C, 1 + k, H/8, W/8)``."""
        self.check_video(video)
        z = torch.cat([self.posterior_latents(clips, self.sample_posterior)
                       for clips in video.split(self.chunk_size)])  # (B, C, 1 + k, h, w)
        z = (z - self.latents_mean.float()) * (1.0 / self.latents_std.float())
        return z.to(video.dtype)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents ``(B, C, 1 + k, h, w)`` to video ``(B, 3, 1 + 4k, 8h, 8w)`` in [-1, 1]."""
        self.check_latents(latents)
        z = latents.float() / (1.0 / self.latents_std.float()) + self.latents_mean.float()  # (B, C, 1 + k, h, w)
        video = torch.cat([self.vae.decode(clips.to(self.vae_dtype)).sample
                           for clips in z.split(self.chunk_size)])  # (B, 3, 1 + 4k, H, W)
        return video.clamp(-1, 1).to(latents.dtype)
