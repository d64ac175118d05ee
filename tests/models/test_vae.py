"""The pretrained VAE codecs: shapes, scaling, chunking, frame-count rules, folders, freezing, checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from tests.helpers.tiny_vae import TINY_SD_VAE, TINY_WAN_VAE, save_tiny_sd_vae, save_tiny_wan_vae
from tpdiff_lightning.data.latent_cache import check_codec, module_identity
from tpdiff_lightning.method.pyramid import TemporalPyramid
from tpdiff_lightning.models.vae import SDVAECodec, WanVAECodec


@pytest.fixture(scope="module")
def sd_root(tmp_path_factory):
    return save_tiny_sd_vae(tmp_path_factory.mktemp("sd15"))


@pytest.fixture(scope="module")
def wan_root(tmp_path_factory):
    return save_tiny_wan_vae(tmp_path_factory.mktemp("wan21"))


def smooth_video(B: int, F: int, H: int, W: int, seed: int = 0) -> torch.Tensor:
    """A random but smooth clip ``(B, 3, F, H, W)`` in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(B, 3, F, H // 4, W // 4, generator=g) * 2 - 1
    return nn.functional.interpolate(coarse, size=(F, H, W), mode="trilinear")


def test_sd_round_trip_shapes(sd_root):
    codec = SDVAECodec(str(sd_root))
    video = smooth_video(2, 5, 16, 24)
    latents = codec.encode(video)
    assert latents.shape == (2, 4, 5, 2, 3)
    assert codec.latent_frames(5) == 5 and codec.temporal_compression == 1 and codec.spatial_compression == 8
    decoded = codec.decode(latents)
    assert decoded.shape == video.shape
    assert decoded.min() >= -1 and decoded.max() <= 1


def test_sd_latents_are_scaled_posterior_means_frame_by_frame(sd_root):
    from diffusers import AutoencoderKL

    codec = SDVAECodec(str(sd_root))
    raw_vae = AutoencoderKL.from_pretrained(str(sd_root / "vae"))
    video = smooth_video(2, 3, 16, 16)
    latents = codec.encode(video)
    for b in range(2):
        for f in range(3):
            mean = raw_vae.encode(video[b : b + 1, :, f]).latent_dist.mean[0]  # (C, h, w)
            assert_close(latents[b, :, f], mean * 0.18215, rtol=1e-4, atol=1e-5)


def test_sd_shift_factor_and_decode_inverts_scaling(tmp_path):
    from diffusers import AutoencoderKL

    root = save_tiny_sd_vae(tmp_path, scaling_factor=1.5, shift_factor=0.1)
    codec = SDVAECodec(str(root))
    raw_vae = AutoencoderKL.from_pretrained(str(root / "vae"))
    video = smooth_video(1, 2, 16, 16)
    mean = raw_vae.encode(video[:, :, 0]).latent_dist.mean  # (1, C, h, w)
    assert_close(codec.encode(video)[:, :, 0], (mean - 0.1) * 1.5, rtol=1e-4, atol=1e-5)
    latents = torch.randn(1, 4, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    expected = raw_vae.decode(latents[:, :, 1] / 1.5 + 0.1).sample.clamp(-1, 1)  # (1, 3, H, W)
    assert_close(codec.decode(latents)[:, :, 1], expected, rtol=1e-4, atol=1e-5)


def test_sd_chunked_encode_and_decode_equal_unchunked(sd_root):
    video = smooth_video(3, 4, 16, 16)  # 12 frames: chunks of 5 cut across clips
    whole, chunked = SDVAECodec(str(sd_root), chunk_size=64), SDVAECodec(str(sd_root), chunk_size=5)
    latents = whole.encode(video)
    assert_close(chunked.encode(video), latents, rtol=1e-5, atol=1e-6)
    assert_close(chunked.decode(latents), whole.decode(latents), rtol=1e-5, atol=1e-6)


def test_sd_posterior_sampling_differs_from_mean(sd_root):
    video = smooth_video(1, 2, 16, 16)
    mean = SDVAECodec(str(sd_root)).encode(video)
    torch.manual_seed(0)
    drawn = SDVAECodec(str(sd_root), sample_posterior=True).encode(video)
    assert drawn.shape == mean.shape and not torch.allclose(drawn, mean)


def test_wan_round_trip_and_normalisation(wan_root):
    from diffusers import AutoencoderKLWan

    codec = WanVAECodec(str(wan_root))
    raw_vae = AutoencoderKLWan.from_pretrained(str(wan_root / "vae"))
    video = smooth_video(2, 9, 16, 16)
    latents = codec.encode(video)
    assert latents.shape == (2, 4, 3, 2, 2)
    assert (codec.temporal_compression, codec.spatial_compression) == (4, 8)
    mean = torch.tensor(TINY_WAN_VAE["latents_mean"]).view(1, 4, 1, 1, 1)
    std = torch.tensor(TINY_WAN_VAE["latents_std"]).view(1, 4, 1, 1, 1)
    raw = raw_vae.encode(video).latent_dist.mean  # (2, 4, 3, 2, 2)
    assert_close(latents, (raw - mean) / std, rtol=1e-4, atol=1e-5)
    decoded = codec.decode(latents)
    assert decoded.shape == video.shape
    assert_close(decoded, raw_vae.decode(raw).sample, rtol=1e-4, atol=1e-5)


def test_wan_chunked_encode_equals_unchunked(wan_root):
    video = smooth_video(3, 5, 16, 16)
    one_by_one, together = WanVAECodec(str(wan_root), chunk_size=1), WanVAECodec(str(wan_root), chunk_size=3)
    assert_close(one_by_one.encode(video), together.encode(video), rtol=1e-5, atol=1e-6)


def test_wan_latent_frames_feed_the_anchored_pyramid(wan_root):
    codec = WanVAECodec(str(wan_root))
    assert codec.latent_frames(81) == 21  # the paper's Wan setup
    paper = TemporalPyramid("flow", codec.latent_frames(81), 3, reductions=[2, 2], anchor_first_frame=True)
    assert [s.num_frames for s in paper.stages] == [6, 11, 21]

    latents = codec.encode(smooth_video(1, 17, 16, 16))  # 17 = 1 + 4*4 frames -> 5 latent frames
    assert latents.shape[2] == codec.latent_frames(17) == 5
    pyramid = TemporalPyramid("flow", latents.shape[2], 3, reductions=[2, 2], anchor_first_frame=True)
    for i, stage in enumerate(pyramid.stages):
        noise = torch.randn(pyramid.stage_shape(latents, i))
        x_start, x_end = pyramid.endpoints(latents, noise, i)
        assert x_start.shape[2] == x_end.shape[2] == stage.num_frames
    assert [s.num_frames for s in pyramid.stages] == [2, 3, 5]


@pytest.mark.parametrize("num_frames", [0, 2, 8, 20])
def test_wan_rejects_frame_counts_not_one_plus_4k(wan_root, num_frames):
    codec = WanVAECodec(str(wan_root))
    with pytest.raises(ValueError, match=rf"num_frames={num_frames} .*1 \+ 4k"):
        codec.latent_frames(num_frames)
    if num_frames:
        with pytest.raises(ValueError, match=rf"num_frames={num_frames} .*1 \+ 4k"):
            codec.encode(torch.zeros(1, 3, num_frames, 16, 16))


def test_bad_video_and_latent_shapes_are_clear_errors(sd_root):
    codec = SDVAECodec(str(sd_root))
    with pytest.raises(ValueError, match=r"num_frames=0 .*at least 1"):
        codec.check_frames(0)
    with pytest.raises(ValueError, match=r"12x16 .*divisible by its spatial compression 8"):
        codec.encode(torch.zeros(1, 3, 2, 12, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, F, H, W\), got \(1, 4, 2, 16, 16\)"):
        codec.encode(torch.zeros(1, 4, 2, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 4, F, H, W\), got \(1, 3, 2, 2, 2\)"):
        codec.decode(torch.zeros(1, 3, 2, 2, 2))
    with pytest.raises(ValueError, match="chunk_size=0"):
        SDVAECodec(str(sd_root), chunk_size=0)


def test_missing_folders_and_bad_arguments(tmp_path, sd_root):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model.*does not exist"):
        SDVAECodec(str(missing))
    (tmp_path / "pipeline").mkdir()
    with pytest.raises(FileNotFoundError, match=r"pipeline/vae.*does not exist"):
        WanVAECodec(str(tmp_path / "pipeline"))
    (tmp_path / "pipeline" / "vae").mkdir()
    (tmp_path / "pipeline" / "vae" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no weight file"):
        WanVAECodec(str(tmp_path / "pipeline"))
    with pytest.raises(ValueError, match="exactly one"):
        SDVAECodec(str(sd_root), config=TINY_SD_VAE)
    with pytest.raises(ValueError, match="exactly one"):
        SDVAECodec()
    with pytest.raises(ValueError, match="dtype='float8'"):
        SDVAECodec(str(sd_root), dtype="float8")


def test_pipeline_root_and_vae_folder_give_the_same_codec(sd_root):
    from_root, from_vae = SDVAECodec(str(sd_root)), SDVAECodec(str(sd_root / "vae"), subfolder=None)
    assert from_root.name == from_vae.name and from_root.name.startswith(f"sd-vae:{sd_root.name}/vae:")
    check_codec(module_identity(from_root), from_vae)
    video = smooth_video(1, 2, 16, 16)
    assert_close(from_root.encode(video), from_vae.encode(video))


def test_codec_name_tells_configs_apart(tmp_path, sd_root):
    other = SDVAECodec(str(save_tiny_sd_vae(tmp_path / sd_root.name, scaling_factor=0.13025)))
    with pytest.raises(ValueError, match="encoded with codec"):
        check_codec(module_identity(SDVAECodec(str(sd_root))), other)


def test_codecs_are_frozen(sd_root, wan_root):
    for codec in (SDVAECodec(str(sd_root)), WanVAECodec(str(wan_root))):
        codec.train()
        assert not codec.vae.training
        assert not any(p.requires_grad for p in codec.parameters())
        frames = 5 if isinstance(codec, WanVAECodec) else 2
        latents = codec.encode(smooth_video(1, frames, 16, 16).requires_grad_(True))
        assert not latents.requires_grad and not codec.decode(latents).requires_grad


def test_folder_weights_stay_out_of_checkpoints(sd_root):
    parent = nn.ModuleDict({"head": nn.Linear(2, 2), "codec": SDVAECodec(str(sd_root))})
    state = parent.state_dict()
    assert set(state) == {"head.weight", "head.bias"}
    changed = {k: v + 1 for k, v in state.items()}
    fresh = nn.ModuleDict({"head": nn.Linear(2, 2), "codec": SDVAECodec(str(sd_root))})
    fresh.load_state_dict(changed, strict=True)
    assert_close(fresh["head"].weight, changed["head.weight"])
    with pytest.raises(RuntimeError, match="Missing key"):  # only the folder's weights are forgiven
        fresh.load_state_dict({"head.weight": changed["head.weight"]}, strict=True)


def test_config_built_codec_keeps_its_random_weights_in_checkpoints():
    codec = WanVAECodec(config=TINY_WAN_VAE)
    assert codec.name.startswith("wan-vae:config:")
    keys = codec.state_dict().keys()
    assert keys and all(k.startswith("vae.") for k in keys)


def test_bfloat16_weights_keep_the_callers_dtype(sd_root):
    codec = SDVAECodec(str(sd_root), dtype="bfloat16")
    assert codec.vae_dtype == torch.bfloat16
    latents = codec.encode(smooth_video(1, 2, 16, 16))
    assert latents.dtype == torch.float32 and codec.decode(latents).dtype == torch.float32
