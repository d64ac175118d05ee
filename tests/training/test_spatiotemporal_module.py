"""The spatio-temporal pyramid through TPDiffModule and the built-in DiT: smaller token grids, positions on
one grid, checkpoints, and clear refusals."""

import lightning
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from tests.helpers.settings import merged
from tpdiff_lightning.models.dit import VideoDiT
from tpdiff_lightning.models.rope import RoPE3D
from tpdiff_lightning.training.module import TPDiffModule

TEXT_DIM = 32


def _module(**overrides):
    torch.manual_seed(0)
    defaults = {"clip": {"num_frames": 16, "resolution": 32}, "optimization": {"ema_decay": None},
                "sampling": {"steps": 6}, "pyramid": {"spatial_reductions": [1, 2]}}
    return TPDiffModule(**merged(defaults, overrides))


def _batch(B=2, F=16, H=32):
    g = torch.Generator().manual_seed(0)
    return {"video": torch.rand(B, 3, F, H, H, generator=g) * 2 - 1, "caption": ["a red square moving right"] * B}


# ---- The DiT: a smaller token grid with positions on the full-resolution grid ----------------------------------

@pytest.mark.parametrize("P", [2, 4])
def test_rope_places_a_strided_grid_on_the_full_grid(P):
    rope = RoPE3D(head_dim=24)
    full = rope.angles(4, 8, 8).reshape(4, 8, 8, -1)
    small = rope.angles(4, 8 // P, 8 // P, spatial_stride=P).reshape(4, 8 // P, 8 // P, -1)
    assert torch.equal(small, full[:, ::P, ::P])  # token (a, b) at (a P, b P)
    centre = rope.angles(4, 8 // P, 8 // P, spatial_stride=P, placement="centre").reshape(4, 8 // P, 8 // P, -1)
    n_t = rope.split[0]
    half = torch.arange(8 // P, dtype=torch.float64) * P + (P - 1) / 2  # (a + 1/2) P - 1/2
    freqs_h = 1.0 / rope.theta ** (torch.arange(rope.split[1], dtype=torch.float64) / rope.split[1])
    assert_close(centre[0, :, 0, n_t:n_t + rope.split[1]], half[:, None] * freqs_h, rtol=0, atol=1e-12)
    assert torch.equal(centre[..., :n_t], small[..., :n_t])  # time is untouched


def test_dit_takes_a_2x2_token_grid_and_is_unchanged_at_spatial_stride_1():
    torch.manual_seed(0)
    net = VideoDiT(3, TEXT_DIM)  # dit-tiny, patch 8
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 16, 16, generator=g)  # 16x16 pixels = 2x2 tokens
    t, text = torch.rand(2, generator=g) * 1000, torch.randn(2, 5, TEXT_DIM, generator=g)
    out = net(x, t, text, stride=4, spatial_stride=2)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.equal(net(x, t, text, stride=4), net(x, t, text, stride=4, spatial_stride=1))
    assert not torch.allclose(out, net(x, t, text, stride=4), atol=1e-6)  # the positions reach the output
    with pytest.raises(ValueError, match="spatial_positions='middle' is invalid"):
        VideoDiT(3, TEXT_DIM, spatial_positions="middle")


@pytest.mark.parametrize("H,P", [(16, 2), (32, 4)])
def test_centred_positions_give_the_dits_output_of_corner_positions(H, P):
    """RoPE attention sees only position differences, and "centre" moves every token of a stage by the same
    (P - 1)/2: the DiT's output is the same (the measured training curves were too). The stride still matters."""
    torch.manual_seed(0)
    corner = VideoDiT(3, TEXT_DIM).double()
    with torch.no_grad():
        for p in corner.parameters():
            p.normal_(0, 0.05)
    centre = VideoDiT(3, TEXT_DIM, spatial_positions="centre").double()
    centre.load_state_dict(corner.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, H, H, generator=g, dtype=torch.float64)
    t, text = torch.full((2,), 500.0, dtype=torch.float64), torch.randn(2, 5, TEXT_DIM, generator=g, dtype=torch.float64)
    out = corner(x, t, text, stride=4, spatial_stride=P)
    assert_close(centre(x, t, text, stride=4, spatial_stride=P), out, rtol=0, atol=1e-7)
    assert (out - corner(x, t, text, stride=4, spatial_stride=1)).abs().max() > 1e-3  # the spacing P does matter


# ---- The module: training, sampling, checkpoints -----------------------------------------------------------

def test_each_stage_trains_at_its_size_and_tells_the_backbone_both_strides():
    m = _module()
    seen = []
    original = m.backbone.forward
    m.backbone.forward = lambda x, *a, **k: (seen.append((tuple(x.shape[2:]), k)), original(x, *a, **k))[1]
    batch = _batch()
    x0 = m.encode_video(batch["video"])
    text, mask = m.text_encoder(batch["caption"])
    for i in range(3):
        assert torch.isfinite(m.stage_loss(x0, text, mask, i))
    assert seen == [((4, 16, 16), {"stride": 4, "spatial_stride": 2}), ((8, 16, 16), {"stride": 2, "spatial_stride": 2}),
                    ((16, 32, 32), {"stride": 1})]


def test_alignment_pairs_noise_with_the_data_at_the_stages_shape(monkeypatch):
    import tpdiff_lightning.training.module as module

    m = _module()
    shapes = []
    monkeypatch.setattr(module, "align_noise", lambda data, noise: (shapes.append((data.shape, noise.shape)), noise)[1])
    batch = _batch()
    x0 = m.encode_video(batch["video"])
    text, mask = m.text_encoder(batch["caption"])
    m.stage_loss(x0, text, mask, 0)
    assert shapes == [(torch.Size([2, 3, 4, 16, 16]), torch.Size([2, 3, 4, 16, 16]))]


def test_training_step_and_generate_work_end_to_end():
    m = _module()
    m.log = lambda *a, **k: None
    assert torch.isfinite(m.training_step(_batch(), 0))
    video = m.generate(["a red square"], [3])
    assert video.shape == (1, 3, 16, 32, 32) and torch.isfinite(video).all()


def test_spatial_reductions_are_stored_with_the_checkpoint(tmp_path):
    m = _module()
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams),
                "pytorch-lightning_version": lightning.__version__, "global_step": 0}, path)
    loaded = TPDiffModule.load_from_checkpoint(path)
    assert loaded.pyramid.spatial_reductions == (1, 2)
    assert [s.spatial_stride for s in loaded.pyramid.stages] == [2, 2, 1]
    assert torch.equal(loaded.generate(["a"], [1]), m.generate(["a"], [1]))


# ---- Clear refusals ------------------------------------------------------------------------------------------

class StrideOnlyBackbone(nn.Module):
    """A backbone with the temporal stride only, as the Wan, AnimateDiff and Flux adapters are."""

    def __init__(self, in_channels, text_dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x, t, text, text_mask=None, stride=1):
        return self.scale * x


@pytest.mark.parametrize("kwargs,match", [
    (dict(backbone=StrideOnlyBackbone), r"^model\.init_args\.pyramid\.spatial_reductions=\[1, 2\] needs a backbone whose forward takes "
                                        r"spatial_stride; StrideOnlyBackbone does not"),
    (dict(clip={"resolution": 24}), r"^model\.init_args\.pyramid\.spatial_reductions=\[1, 2\] shrinks the 24x24 latents by 2 at stage 0; expected height "
                          r"divisible by 16 and width by 16 \(spatial stride 2 x backbone patch_size 8\)"),
    (dict(pyramid={"spatial_reductions": [2]}),
     r"^model\.init_args\.pyramid\.spatial_reductions=\[2\] has length 1; expected num_stages - 1 = 2"),
    (dict(pyramid={"spatial_reductions": [0, 2]}),
     r"^model\.init_args\.pyramid\.spatial_reductions=\[0, 2\] is invalid; expected integers >= 1"),
])
def test_bad_spatial_settings_are_one_clear_error_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        _module(**kwargs)
    assert "\n" not in str(info.value)


def _animatediff_module(**kwargs):
    from tests.helpers.tiny_animatediff import tiny_animatediff_config
    from tpdiff_lightning.models.animatediff import AnimateDiffBackbone
    from tpdiff_lightning.models.codec import IdentityCodec

    def factory(c, d):
        return AnimateDiffBackbone(c, d, config=tiny_animatediff_config(c, d))

    return _module(codec=IdentityCodec(), backbone=factory, objective={"schedule": "ddim", "beta_schedule": "linear"}, **kwargs)


def test_the_animatediff_unet_trains_and_samples_each_stage_at_its_latent_size():
    m = _animatediff_module(clip={"resolution": 16})
    seen = []
    original = m.backbone.model.forward
    m.backbone.model.forward = lambda x, *a, **k: (seen.append(tuple(x.shape[2:])), original(x, *a, **k))[1]
    batch = _batch(H=16)
    x0 = m.encode_video(batch["video"])
    text, mask = m.text_encoder(batch["caption"])
    for i in range(3):
        assert torch.isfinite(m.stage_loss(x0, text, mask, i))
    assert seen == [(4, 8, 8), (8, 8, 8), (16, 16, 16)]
    video = m.generate(["a red square"], [3])
    assert video.shape == (1, 3, 16, 16, 16) and torch.isfinite(video).all()


def test_animatediff_takes_latent_sizes_its_down_sampling_does_not_divide():
    """The tiny UNet halves once: a 5x5 stage-0 latent does not halve evenly, and the UNet still returns 5x5."""
    m = _animatediff_module(clip={"resolution": 10})
    batch = _batch(H=10)
    x0 = m.encode_video(batch["video"])
    text, mask = m.text_encoder(batch["caption"])
    for i, size in enumerate([(4, 5, 5), (8, 5, 5), (16, 10, 10)]):
        stage = m.pyramid.stages[i]
        x = torch.randn(2, 3, *size)
        out = m.backbone(x, torch.full((2,), 500.0), text, mask, **m.stage_strides(stage))
        assert out.shape == x.shape
        assert torch.isfinite(m.stage_loss(x0, text, mask, i))


# ---- Wan and Flux: positions on the full-resolution grid ---------------------------------------------------

def test_wan_rotary_puts_a_strided_grid_on_the_full_grid_and_is_wans_at_stride_1():
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    from tpdiff_lightning.models.wan import StridedWanRotaryPosEmbed

    original = WanRotaryPosEmbed(attention_head_dim=24, patch_size=(1, 2, 2), max_seq_len=64)
    rope = StridedWanRotaryPosEmbed.from_original(original)
    full = torch.zeros(1, 4, 3, 16, 16)  # 8x8 tokens
    small = torch.zeros(1, 4, 3, 8, 8)  # 4x4 tokens
    for a, b in zip(rope(full), original(full)):
        assert torch.equal(a, b)
    rope.spatial_stride = 2
    for a, b in zip(rope(small), original(full)):
        assert torch.equal(a.reshape(3, 4, 4, -1), b.reshape(3, 8, 8, -1)[:, ::2, ::2])


def test_wan_backbone_trains_a_spatiotemporal_stage_through_the_module():
    from tests.helpers.tiny_wan import tiny_wan_config
    from tpdiff_lightning.models.codec import IdentityCodec
    from tpdiff_lightning.models.wan import WanBackbone

    m = _module(codec=IdentityCodec(), clip={"resolution": 16}, objective={"flow_velocity": "global"},
                backbone=lambda c, d: WanBackbone(c, d, config=tiny_wan_config(c, d)))
    seen = []
    original = m.backbone.model.rope.forward
    m.backbone.model.rope.forward = lambda h: (seen.append((tuple(h.shape[3:]), m.backbone.model.rope.spatial_stride)),
                                               original(h))[1]
    batch = _batch(H=16)
    x0 = m.encode_video(batch["video"])
    text, mask = m.text_encoder(batch["caption"])
    for i in range(3):
        assert torch.isfinite(m.stage_loss(x0, text, mask, i))
    assert seen == [((8, 8), 2), ((8, 8), 2), ((16, 16), 1)]
    assert m.backbone.model.rope.spatial_stride == 1  # reset after the forward


def test_flux_image_ids_put_token_rows_and_columns_at_the_spatial_stride():
    from tpdiff_lightning.models.flux_video import image_ids

    full = image_ids(2, 4, 6, stride=2).reshape(2, 4, 6, 3)
    small = image_ids(2, 2, 3, stride=2, spatial_stride=2).reshape(2, 2, 3, 3)
    assert torch.equal(small, full[:, ::2, ::2])
    assert torch.equal(image_ids(2, 4, 6, 2, spatial_stride=1), image_ids(2, 4, 6, 2))
