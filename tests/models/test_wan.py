"""The Wan2.1 adapter: strided rotary positions, loading from local folders, LoRA, checkpointing, velocity sign."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
from torch.testing import assert_close

from tests.helpers.tiny_wan import save_tiny_wan, tiny_wan_config
from tpdiff_lightning.method.pyramid import TemporalPyramid
from tpdiff_lightning.models.lora import LoraSettings
from tpdiff_lightning.models.wan import StridedWanRotaryPosEmbed, WanBackbone

C, D = 4, 32


def tiny_model(seed: int = 0, **kw) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(**tiny_wan_config(C, D, **kw))


def tiny_backbone(seed: int = 0, **kw) -> WanBackbone:
    torch.manual_seed(seed)
    return WanBackbone(C, D, config=tiny_wan_config(C, D), **kw)


def inputs(F: int = 5, B: int = 2, L: int = 6, seed: int = 1, H: int = 8, W: int = 8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, F, H, W, generator=g)
    t = torch.rand(B, generator=g) * 1000
    text = torch.randn(B, L, D, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, L // 2:] = False
    return x, t, text, mask


# Rotary positions


@pytest.mark.parametrize("F,H,W", [(1, 8, 8), (5, 8, 12), (21, 4, 6)])
def test_rope_stride_one_is_bit_identical(F, H, W):
    original = WanRotaryPosEmbed(12, (1, 2, 2), 64)
    strided = StridedWanRotaryPosEmbed.from_original(original)
    x = torch.zeros(1, C, F, H, W)
    for got, want in zip(strided(x), original(x)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("F,S", [(3, 2), (5, 4), (4, 3), (1, 8)])
def test_rope_stride_equals_full_rate_rows(F, S):
    original = WanRotaryPosEmbed(12, (1, 2, 2), 64)
    strided = StridedWanRotaryPosEmbed.from_original(original)
    strided.stride = S
    H, W = 6, 8
    hw = (H // 2) * (W // 2)
    full = original(torch.zeros(1, C, S * F, H, W))
    short = strided(torch.zeros(1, C, F, H, W))
    for got, want in zip(short, full):
        assert got.shape == (1, F * hw, 1, 12)
        want_rows = want.view(S * F, hw, 12)[::S]  # frames 0, S, 2S, ...
        assert torch.equal(got.view(F, hw, 12), want_rows)
    if F > 1:  # and really not the unstrided rows
        assert not torch.equal(short[0], original(torch.zeros(1, C, F, H, W))[0])


def test_rope_position_beyond_table_raises():
    strided = StridedWanRotaryPosEmbed.from_original(WanRotaryPosEmbed(12, (1, 2, 2), 16))
    strided.stride = 4
    strided(torch.zeros(1, C, 4, 4, 4))  # last position 12 < 16
    with pytest.raises(ValueError, match=r"temporal position 16 .*rope_max_seq_len=16"):
        strided(torch.zeros(1, C, 5, 4, 4))


def test_rope_swap_keeps_state_dict():
    backbone = tiny_backbone(seed=3)
    assert isinstance(backbone.model.rope, StridedWanRotaryPosEmbed)
    original = tiny_model(seed=7)
    original_sd = original.state_dict()
    assert set(backbone.model.state_dict()) == set(original_sd)
    backbone.model.load_state_dict(original_sd, strict=True)
    x, t, text, _ = inputs()
    with torch.no_grad():
        want = original(x, t, text, return_dict=False)[0]
        got = backbone(x, t, text, None, stride=1)
    assert torch.equal(got, want)


# Loading


@pytest.fixture
def saved(tmp_path) -> Path:
    return save_tiny_wan(tmp_path / "wan", seed=5)


def test_load_from_folder_matches_in_memory_model(saved):
    model = tiny_model(seed=5)
    backbone = WanBackbone(C, D, pretrained_path=str(saved))
    bare = WanBackbone(C, D, pretrained_path=str(saved / "transformer"))  # the transformer folder itself
    x, t, text, _ = inputs()
    with torch.no_grad():
        want = model(x, t, text, return_dict=False)[0]
        assert torch.equal(backbone(x, t, text), want)
        assert torch.equal(bare(x, t, text), want)


def test_missing_and_incomplete_folders(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        WanBackbone(C, D, pretrained_path=str(tmp_path / "nowhere"))
    no_config = tmp_path / "no_config"
    shutil.copytree(saved, no_config)
    (no_config / "transformer" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing \['config.json'\]"):
        WanBackbone(C, D, pretrained_path=str(no_config))
    no_weights = tmp_path / "no_weights"
    shutil.copytree(saved, no_weights)
    for f in (no_weights / "transformer").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="no weight file"):
        WanBackbone(C, D, pretrained_path=str(no_weights))


def test_channel_and_text_dim_mismatch(saved):
    with pytest.raises(ValueError, match=r"in_channels=16 .*in_channels=4"):
        WanBackbone(16, D, pretrained_path=str(saved))
    with pytest.raises(ValueError, match=r"text_dim=64 .*text_dim=32"):
        WanBackbone(C, 64, pretrained_path=str(saved))
    with pytest.raises(ValueError, match="in_channels=4 .*out_channels=8"):
        WanBackbone(C, D, config=tiny_wan_config(C, D, out_channels=8))
    with pytest.raises(ValueError, match="temporal patch 2"):
        WanBackbone(C, D, config=tiny_wan_config(C, D, patch_size=(2, 2, 2)))


def test_exactly_one_source(saved):
    with pytest.raises(ValueError, match="exactly one of pretrained_path and config"):
        WanBackbone(C, D)
    with pytest.raises(ValueError, match="exactly one of pretrained_path and config"):
        WanBackbone(C, D, pretrained_path=str(saved), config=tiny_wan_config(C, D))


def test_torch_dtype(saved):
    backbone = WanBackbone(C, D, pretrained_path=str(saved), torch_dtype="bfloat16")
    assert backbone.model.proj_out.weight.dtype == torch.bfloat16
    x, t, text, mask = inputs(F=3)
    with torch.no_grad():
        assert backbone(x, t, text, mask).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype='int8'"):
        WanBackbone(C, D, pretrained_path=str(saved), torch_dtype="int8")


def test_torch_dtype_from_a_config_keeps_the_float32_modules_as_from_pretrained_does(saved):
    from_config = WanBackbone(C, D, config=tiny_wan_config(C, D), torch_dtype="bfloat16")
    from_folder = WanBackbone(C, D, pretrained_path=str(saved), torch_dtype="bfloat16")
    dtypes = {n: p.dtype for n, p in from_config.model.named_parameters()}
    assert dtypes == {n: p.dtype for n, p in from_folder.model.named_parameters()}
    assert {torch.float32, torch.bfloat16} == set(dtypes.values())
    assert dtypes["scale_shift_table"] == torch.float32 and dtypes["proj_out.weight"] == torch.bfloat16
    assert all(d == torch.float32 for n, d in dtypes.items() if "time_embedder" in n or ".norm2." in n)


def test_lora_on_a_bf16_base_trains_float32_adapters(saved):
    from tpdiff_lightning.models.lora import LoraSettings

    backbone = WanBackbone(C, D, pretrained_path=str(saved), torch_dtype="bfloat16", lora=LoraSettings(rank=4))
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    assert backbone.model.proj_out.weight.dtype == torch.bfloat16  # the frozen base stays bf16
    x, t, text, mask = inputs(F=3)
    backbone(x, t, text, mask).float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)


# Forward


@pytest.mark.parametrize("F", [1, 3, 5])
def test_output_shape(F):
    x, t, text, mask = inputs(F=F, H=8, W=12)
    with torch.no_grad():
        assert tiny_backbone()(x, t, text, mask, stride=2).shape == x.shape


def test_short_stage_reaches_model_and_stride_changes_positions():
    backbone = tiny_backbone()
    seen = []
    backbone.model.patch_embedding.register_forward_hook(lambda m, args, out: seen.append((args[0].shape, out.shape)))
    x, t, text, mask = inputs(F=3)
    with torch.no_grad():
        out_s1 = backbone(x, t, text, mask, stride=1)
        out_s4 = backbone(x, t, text, mask, stride=4)
    assert seen[0][0][2] == 3 and seen[0][1][2] == 3  # 3 frames in, 3 token frames out
    assert not torch.allclose(out_s1, out_s4)
    assert backbone.model.rope.stride == 1  # reset after the call


def test_text_mask_zeroes_padding_and_text_length_pads():
    backbone = tiny_backbone()
    x, t, text, mask = inputs(F=3)
    garbage = text.clone()
    garbage[~mask] = 1e3
    with torch.no_grad():
        ref = backbone(x, t, text * mask[..., None], None)
        assert torch.equal(backbone(x, t, garbage, mask), ref)
        backbone.text_length = 10
        padded = torch.cat([text * mask[..., None], torch.zeros(2, 4, D)], dim=1)
        got = backbone(x, t, text, mask)
        backbone.text_length = None
        assert_close(got, backbone(x, t, padded, None))
        assert not torch.allclose(got, ref)  # extra zero tokens do change the cross-attention


def test_bad_inputs():
    backbone = tiny_backbone()
    x, t, text, mask = inputs(F=3, H=7, W=8)
    with pytest.raises(ValueError, match=r"H=7, W=8 must be divisible .*\(2, 2\)"):
        backbone(x, t, text, mask)
    x, t, text, mask = inputs(F=3)
    with pytest.raises(ValueError, match=r"expected x of shape \(B, 4, F, H, W\)"):
        backbone(x[:, :3], t, text, mask)
    with pytest.raises(ValueError, match=r"timesteps t of shape \(2,\)"):
        backbone(x, t[:1], text, mask)
    with pytest.raises(ValueError, match=r"text of shape \(2, L, 32\)"):
        backbone(x, t, text[..., :16], mask)
    with pytest.raises(ValueError, match="stride=0"):
        backbone(x, t, text, mask, stride=0)


# Velocity convention


def test_adapter_returns_wan_velocity_unchanged():
    backbone = tiny_backbone()
    x, t, text, mask = inputs(F=3)
    with torch.no_grad():
        raw = backbone.model(x, t, text * mask[..., None], return_dict=False)[0]
        assert torch.equal(backbone(x, t, text, mask), raw)


def test_project_flow_target_is_wans_velocity():
    """One-stage pyramid: x_t equals diffusers' ``scale_noise`` at timestep t·1000, and an Euler step of
    Wan's scheduler with our target as the prediction lands on x0, so Wan's ε − x0 is our target."""
    pyramid = TemporalPyramid("flow", num_frames=4, num_stages=1)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, C, 4, 4, 4, generator=g), torch.randn(2, C, 4, 4, 4, generator=g)
    for sigma in (0.9, 0.35):
        x_t, t, target = pyramid.interpolate(x0, noise, 0, torch.full((2,), sigma))
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        scheduler.set_timesteps(sigmas=[sigma])
        assert_close(scheduler.timesteps[0], (t[0] * pyramid.schedule.timestep_scale).float())
        assert_close(scheduler.scale_noise(x0, scheduler.timesteps[:1], noise), x_t)
        assert_close(scheduler.step(target, scheduler.timesteps[0], x_t).prev_sample, x0, atol=1e-5, rtol=1e-5)
        scheduler.set_timesteps(sigmas=[sigma])  # a step advances the scheduler; rewind it
        wrong_sign = scheduler.step(-target, scheduler.timesteps[0], x_t).prev_sample
        assert not torch.allclose(wrong_sign, x0, atol=1e-2)


@pytest.mark.parametrize("velocity,lands", [("global", True), ("stage", False)])
def test_global_flow_target_is_wans_velocity_inside_every_stage(velocity, lands):
    """Three stages: a step of Wan's own Euler scheduler from t to the stage end e_i, with the pyramid's target
    as the prediction, lands on the stage's end point x̂_e only for the global-time velocity."""
    pyramid = TemporalPyramid("flow", num_frames=9, num_stages=3, anchor_first_frame=True, flow_velocity=velocity)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, C, 9, 4, 4, generator=g, dtype=torch.float64)
    for i, stage in enumerate(pyramid.stages):
        noise = torch.randn(pyramid.stage_shape(x0, i), generator=g, dtype=torch.float64)
        x_t, t, target = pyramid.interpolate(x0, noise, i, torch.full((2,), 0.6, dtype=torch.float64))
        _, x_end = pyramid.endpoints(x0, noise, i)
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        scheduler.set_timesteps(sigmas=[float(t[0]), stage.t_end] if stage.t_end > 0 else [float(t[0])])
        stepped = scheduler.step(target.float(), scheduler.timesteps[0], x_t.float()).prev_sample
        assert torch.allclose(stepped.double(), x_end, atol=1e-5) == lands


# LoRA and gradient checkpointing


def lora_settings() -> LoraSettings:
    return LoraSettings(rank=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])


def test_lora_trains_only_adapters():
    backbone = tiny_backbone(lora=lora_settings())
    assert backbone.has_lora and not tiny_backbone().has_lora
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    opt = torch.optim.SGD([p for p in backbone.parameters() if p.requires_grad], lr=0.1)
    x, t, text, mask = inputs(F=3)
    backbone(x, t, text, mask, stride=2).square().mean().backward()
    opt.step()
    changed = {n for n, p in backbone.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable


def test_adapter_state_dict_holds_no_base_weights():
    backbone = tiny_backbone(lora=lora_settings())
    adapter = backbone.adapter_state_dict()
    base_keys = set(tiny_model().state_dict())
    num_layers, targets_per_attention, attentions_per_block = 2, 4, 2
    assert len(adapter) == 2 * num_layers * targets_per_attention * attentions_per_block  # lora_A, lora_B each
    assert all("lora_" in k for k in adapter) and not set(adapter) & base_keys
    with pytest.raises(ValueError, match="no LoRA adapter"):
        tiny_backbone().adapter_state_dict()


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_same_output_and_grads(lora):
    kw = dict(lora=lora_settings()) if lora else {}
    plain, ckpt = tiny_backbone(**kw), tiny_backbone(gradient_checkpointing=True, **kw)
    assert ckpt.model.gradient_checkpointing and not plain.model.gradient_checkpointing
    if lora:  # make lora_B non-zero so that every adapter gets a gradient
        for m in (plain, ckpt):
            torch.manual_seed(4)
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.data.normal_(std=0.1)
    x, t, text, mask = inputs(F=3)
    outs = []
    for m in (plain, ckpt):
        m.train()
        out = m(x, t, text, mask, stride=2)
        out.square().mean().backward()
        outs.append(out)
    assert_close(outs[1], outs[0])
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (plain, ckpt)]
    assert set(grads[0]) == set(grads[1]) and all(g is not None for g in grads[1].values())
    for n in grads[0]:
        assert_close(grads[1][n], grads[0][n])
    assert any(g.abs().sum() > 0 for g in grads[1].values())


def test_fsdp_finds_the_wan_blocks():
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    from tpdiff_lightning.distributed.fsdp2 import block_classes, find_blocks

    blocks = find_blocks(tiny_backbone(), block_classes())
    assert len(blocks) == 2 and all(isinstance(b, WanTransformerBlock) for b in blocks)


def test_tiny_wan_saves_diffusers_layout(tmp_path):
    folder = save_tiny_wan(tmp_path / "w", in_channels=8, text_dim=16)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "WanTransformer3DModel" and config["in_channels"] == 8
    assert config["text_dim"] == 16 and any((folder / "transformer").glob("*.safetensors"))
