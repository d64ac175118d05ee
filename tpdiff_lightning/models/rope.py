"""3D rotary position embedding over (frame, row, column) with stage-consistent frame positions.

Frame j of a stage with temporal stride S sits at position j·S of the full-rate timeline (SPEC, Eq. 14),
so a low-frame-rate stage sees the same temporal geometry as the full-rate model. In a spatio-temporal
pyramid, token row and column ``(a, b)`` of a stage with spatial stride P sit at ``(a·P, b·P)`` of the
full-resolution token grid (``"corner"``), or at the centre of the area they cover, ``(a + ½)·P − ½``
(``"centre"``). Angles are computed from positions on the fly: there is no length table, so any frame
count and stride work.
"""

import torch
from torch import Tensor, nn


def temporal_positions(num_frames: int, stride: int, device: torch.device | None = None) -> Tensor:
    """Full-rate timeline positions `j·S` of the frames `j = 0 … F−1` of a stage with stride S (Eq. 14)."""
    if num_frames < 1 or stride < 1:
        raise ValueError(f"expected num_frames >= 1 and stride >= 1, got num_frames={num_frames}, stride={stride}")
    return torch.arange(num_frames, device=device) * stride


SPATIAL_POSITIONS = ("corner", "centre")


def spatial_positions(size: int, spatial_stride: int, placement: str = "corner", device=None) -> Tensor:
    """Full-resolution grid positions of the ``size`` token rows (or columns) of a stage with spatial stride P:
    ``a·P`` (``"corner"``) or ``(a + ½)·P − ½`` (``"centre"``); both are ``a`` at ``P = 1``. Float64."""
    if placement not in SPATIAL_POSITIONS:
        raise ValueError(f"spatial_positions={placement!r} is invalid; expected one of {list(SPATIAL_POSITIONS)}")
    pos = torch.arange(size, device=device, dtype=torch.float64) * spatial_stride
    return pos + 0.5 * (spatial_stride - 1) if placement == "centre" else pos


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs `(x[..., i], x[..., i + d/2])` of `x (..., N, d)` by the angles behind `cos, sin (N, d/2)`."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (..., N, d/2) each
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (..., N, d)
    return out.type_as(x)


class RoPE3D(nn.Module):
    """Splits the head dimension into temporal, height and width parts, each rotated by its own axis position."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2 != 0 or head_dim < 6:
            raise ValueError(f"RoPE3D needs an even head_dim >= 6, got head_dim={head_dim}")
        half = head_dim // 2
        # Spatial axes get equal shares; time takes the rest, so it gets the most frequencies.
        n_space = half // 3
        self.split = (half - 2 * n_space, n_space, n_space)
        self.theta = theta

    def _freqs(self, n: int, device: torch.device | None) -> Tensor:
        # Not a buffer: `model.to(bfloat16)` would round the frequencies along with the weights.
        return 1.0 / self.theta ** (torch.arange(n, device=device, dtype=torch.float64) / n)

    def angles(self, num_frames: int, height: int, width: int, stride: int = 1, device=None,
               spatial_stride: int = 1, placement: str = "corner") -> Tensor:
        """Rotation angles `(F·h·w, head_dim/2)` for tokens ordered frame-major, then row, then column."""
        freqs_t, freqs_h, freqs_w = (self._freqs(n, device) for n in self.split)
        pos_t = temporal_positions(num_frames, stride, device).double()
        pos_h = spatial_positions(height, spatial_stride, placement, device)
        pos_w = spatial_positions(width, spatial_stride, placement, device)
        ang_t = (pos_t[:, None] * freqs_t)[:, None, None].expand(-1, height, width, -1)  # (F, h, w, n_t)
        ang_h = (pos_h[:, None] * freqs_h)[None, :, None].expand(num_frames, -1, width, -1)  # (F, h, w, n_s)
        ang_w = (pos_w[:, None] * freqs_w)[None, None, :].expand(num_frames, height, -1, -1)  # (F, h, w, n_s)
        return torch.cat([ang_t, ang_h, ang_w], dim=-1).flatten(0, 2)  # (F*h*w, head_dim/2)

    def forward(self, num_frames: int, height: int, width: int, stride: int = 1, device=None,
                spatial_stride: int = 1, placement: str = "corner") -> tuple[Tensor, Tensor]:
        """Return `(cos, sin)`, each `(F·h·w, head_dim/2)` in float32, for use with `rotate`."""
        # Angles in float64 so that large positions (long clips, big strides) stay exact before the cast.
        ang = self.angles(num_frames, height, width, stride, device, spatial_stride, placement)
        return ang.cos().float(), ang.sin().float()
