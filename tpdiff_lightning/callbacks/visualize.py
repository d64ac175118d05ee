"""Pictures of generated clips: contact sheets (PNG) and animated GIFs for TensorBoard."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


def contact_sheet(videos: Sequence[np.ndarray], captions: Sequence[str] | None = None, max_frames: int = 16,
                  scale: int = 2, label_height: int = 12) -> Image.Image:
    """One row per clip (uint8 ``(F, H, W, 3)``), frames left to right, with the caption above each row."""
    if not videos:
        raise ValueError("contact_sheet needs at least one video; got none")
    H, W = videos[0].shape[1:3]
    cols = min(max_frames, max(v.shape[0] for v in videos))
    cell_h, cell_w = H * scale, W * scale
    row_h = cell_h + (label_height if captions else 0)
    sheet = Image.new("RGB", (cols * cell_w, len(videos) * row_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, video in enumerate(videos):
        top = r * row_h
        if captions:
            draw.text((2, top), captions[r][: cols * cell_w // 6], fill=(0, 0, 0))
            top += label_height
        step = max(1, video.shape[0] // cols)
        for c, frame in enumerate(video[::step][:cols]):
            sheet.paste(Image.fromarray(frame).resize((cell_w, cell_h), Image.NEAREST), (c * cell_w, top))
    return sheet


def save_contact_sheet(path: str | Path, videos: Sequence[np.ndarray], captions: Sequence[str] | None = None) -> Path:
    """Write :func:`contact_sheet` as a PNG and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(videos, captions).save(path)
    return path


def gif_bytes(video: np.ndarray, fps: int = 8, scale: int = 2) -> bytes:
    """Encode uint8 ``(F, H, W, 3)`` as a looping animated GIF."""
    frames = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in video]
    buffer = BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return buffer.getvalue()


def side_by_side(videos: Sequence[np.ndarray]) -> np.ndarray:
    """Tile clips of equal shape horizontally: ``N x (F, H, W, 3)`` to ``(F, H, N*W, 3)``."""
    return np.concatenate(list(videos), axis=2)
