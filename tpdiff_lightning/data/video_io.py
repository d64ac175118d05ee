"""Encode and decode H.264 mp4 clips in memory with PyAV (torchvision has no CPU build here)."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Callable, Sequence

import av
import numpy as np
from av.video.reformatter import VideoReformatter


class ClipLengthError(ValueError):
    """A sample with too few frames for the clip asked for: it has `frames`, and `num_frames` taken every `step`-th
    frame need `span` = (num_frames - 1) * step + 1 of them (`exact`: exactly `num_frames`, for latents of a
    temporally compressing codec). `unit` names what is counted, e.g. "frames" or "latent frames"."""

    def __init__(self, message: str, frames: int, num_frames: int, step: int = 1, unit: str = "frames",
                 exact: bool = False) -> None:
        super().__init__(message)
        self.frames, self.num_frames, self.step, self.unit, self.exact = frames, num_frames, step, unit, exact

    @property
    def span(self) -> int:
        """Frames one clip covers."""
        return (self.num_frames - 1) * self.step + 1

    def __reduce__(self):
        return type(self), (str(self), self.frames, self.num_frames, self.step, self.unit, self.exact)


def _check_frames(frames: np.ndarray) -> None:
    """Raise ValueError unless `frames` is uint8 (F, H, W, 3) with F >= 1 and even H, W (yuv420p)."""
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        got = getattr(frames, "dtype", type(frames).__name__)
        raise ValueError(f"frames must be a uint8 numpy array, got {got}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must have shape (F, H, W, 3) with F >= 1, got {frames.shape}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even height and width, got H={height}, W={width}")


def x264_options(crf: int) -> dict[str, str]:
    """libx264 options for an encode at `crf`, with the macroblock tree off. With it on, libx264 reads uninitialised
    stack memory (valgrind, on 16-pixel-wide clips), and rebuilds of the same synthetic clips gave other bytes for
    some of them at widths 16 to 160 (none with it off); the tree only tunes the rate, so off costs a little size."""
    return {"crf": str(crf), "preset": "veryfast", "x264-params": "mbtree=0"}


def encode_mp4(frames: np.ndarray, fps: int = 8, crf: int = 23) -> bytes:
    """Encode uint8 RGB frames (F, H, W, 3) as an H.264 (libx264, yuv420p) mp4 and return its bytes; on one machine
    the same frames give the same bytes (`x264_options`)."""
    _check_frames(frames)
    if fps < 1:
        raise ValueError(f"fps must be a positive integer, got {fps}")
    buffer = BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options=x264_options(crf))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def decode_mp4(
    data: bytes, max_frames: int | None = None, keep: Callable[[int], Sequence[int]] | None = None
) -> np.ndarray:
    """Decode mp4 bytes into uint8 RGB frames (F, H, W, 3), stopping after `max_frames` when given.

    `keep(n)`, given the number n of decoded frames, returns the indices of the frames to return (it may raise to
    refuse the clip). Only those are converted to RGB: the YUV -> RGB conversion, not the decoding, is most of
    the cost of a small clip, so a 16-frame clip taken from a long video costs little more than 16 frames.
    One reformatter converts every frame of a call, so its conversion context is built once, not per frame
    (the per-frame `to_ndarray(format=...)` rebuilt it: 4x slower on 32x32 frames, the same pixels).
    """
    with av.open(BytesIO(data), "r") as container:
        decoded = []
        for frame in container.decode(video=0):
            decoded.append(frame)
            if max_frames is not None and len(decoded) >= max_frames:
                break
        if not decoded:
            raise ValueError(f"mp4 of {len(data)} bytes holds no decodable video frames")
        indices = range(len(decoded)) if keep is None else keep(len(decoded))
        reformatter = VideoReformatter()
        return np.stack([reformatter.reformat(decoded[i], format="rgb24").to_ndarray() for i in indices])


def mp4_fps(data: bytes) -> float:
    """Frame rate of the first video stream of mp4 bytes (its average rate), without decoding frames."""
    with av.open(BytesIO(data), "r") as container:
        rate = container.streams.video[0].average_rate or container.streams.video[0].base_rate
    if not rate:
        raise ValueError(f"mp4 of {len(data)} bytes states no frame rate")
    return float(rate)


def mp4_shape(data: bytes) -> tuple[int, int, int]:
    """``(frames, height, width)`` of the first video stream of mp4 bytes, from its header and packets (no frame is
    decoded): the header's frame count, else its packets counted."""
    with av.open(BytesIO(data), "r") as container:
        stream = container.streams.video[0]
        height, width = stream.codec_context.height, stream.codec_context.width
        frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
    if not (frames and height and width):
        raise ValueError(f"mp4 of {len(data)} bytes states no video shape (frames={frames}, {height}x{width})")
    return frames, height, width


def write_mp4(path: str | Path, frames: np.ndarray, fps: int = 8) -> None:
    """Write uint8 RGB frames (F, H, W, 3) to an mp4 file at `path`, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_mp4(frames, fps=fps))
