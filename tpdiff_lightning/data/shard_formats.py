"""What a shard holds (mp4 video or pre-encoded latents) and where it lives (a local file, or a URL or ``pipe:``
command that webdataset opens itself)."""

from __future__ import annotations

from tpdiff_lightning.data.latent_cache import LATENT_FORMAT

SAMPLE_FORMATS = ("auto", "video", LATENT_FORMAT)

def check_format(sample_format: str) -> str:
    """Return `sample_format` if known, else raise a ValueError listing the known ones."""
    if sample_format not in SAMPLE_FORMATS:
        raise ValueError(f"sample_format={sample_format!r} is unknown; expected one of {list(SAMPLE_FORMATS)}")
    return sample_format


def is_remote(url: str) -> bool:
    """True for shard names that webdataset opens itself: `pipe:` commands and `scheme://` URLs."""
    return url.startswith("pipe:") or "://" in url
