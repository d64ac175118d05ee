"""Codecs map videos to the space the diffusion runs in, and back.

The interface is `encode(video (B, 3, F, H, W) in [-1, 1]) -> latents (B, latent_channels, F', H', W')`,
`decode(latents) -> video`, `latent_frames(num_frames) -> latent frame count` (a clear error for a frame count
the codec cannot take), plus the attributes `latent_channels`, `name`, `temporal_compression` and
`spatial_compression`. The VAEs in `vae.py` (SD's AutoencoderKL, Wan's causal video VAE) share it.
"""

from torch import Tensor, nn


class IdentityCodec(nn.Module):
    """Pixel-space diffusion: latents are the video itself, the CPU default."""

    name: str = "identity"
    latent_channels: int = 3
    temporal_compression: int = 1
    spatial_compression: int = 1

    def latent_frames(self, num_frames: int) -> int:
        """Pixels are latents: one latent frame per frame."""
        if num_frames < 1:
            raise ValueError(f"num_frames={num_frames} is invalid; expected a positive frame count")
        return num_frames

    def encode(self, video: Tensor) -> Tensor:
        """Return `video (B, 3, F, H, W)` unchanged as latents."""
        if video.ndim != 5 or video.shape[1] != self.latent_channels:
            raise ValueError(f"expected video of shape (B, 3, F, H, W), got {tuple(video.shape)}")
        return video

    def decode(self, latents: Tensor) -> Tensor:
        """Return `latents (B, 3, F, H, W)` unchanged as video in [-1, 1]."""
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents of shape (B, 3, F, H, W), got {tuple(latents.shape)}")
        return latents
