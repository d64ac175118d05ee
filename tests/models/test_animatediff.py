"""The AnimateDiff backbone: loading from local folders, checks, stage-consistent motion positions, training modes."""

from __future__ import annotations

import copy
import json
from functools import partial

import pytest
import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from diffusers.models.embeddings import SinusoidalPositionalEmbedding
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from torch.testing import assert_close

from tests.helpers.tiny_animatediff import save_tiny_animatediff, save_tiny_sd_unet_and_adapter, tiny_animatediff_config
from tpdiff_lightning.models.animatediff import (
    AnimateDiffBackbone,
    StridedSinusoidalPositionalEmbedding,
    install_strided_positions,
    set_temporal_stride,
)
from tpdiff_lightning.models.lora import LoraSettings, lora_state_dict

C, D = 4, 32


pytestmark = pytest.mark.usefixtures("one_thread")


def make_backbone(**kw) -> AnimateDiffBackbone:
    torch.manual_seed(0)
    return AnimateDiffBackbone(C, D, config=tiny_animatediff_config(C, D), **kw)


def inputs(B: int = 2, F: int = 4, H: int = 16, W: int = 16, L: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, F, H, W, generator=g)
    t = torch.rand(B, generator=g) * 999
    text = torch.randn(B, L, D, generator=g)
    return x, t, text, torch.ones(B, L, dtype=torch.bool)


def test_loads_saved_folder_like_in_memory_model(tmp_path):
    root = save_tiny_animatediff(tmp_path, seed=3)
    torch.manual_seed(3)
    reference = UNetMotionModel(**tiny_animatediff_config(C, D)).eval()
    loaded = AnimateDiffBackbone(C, D, pretrained_path=str(root)).eval()
    direct = AnimateDiffBackbone(C, D, pretrained_path=str(root / "unet")).eval()  # the model folder itself
    x, t, text, mask = inputs()
    with torch.no_grad():
        expected = reference(x, t, text.repeat_interleave(x.shape[2], 0)).sample
        assert_close(loaded(x, t, text, mask), expected, rtol=0, atol=0)
        assert_close(direct(x, t, text, mask), expected, rtol=0, atol=0)


def test_sd_unet_plus_motion_adapter_equals_from_unet2d(tmp_path):
    root, adapter_dir = save_tiny_sd_unet_and_adapter(tmp_path, in_channels=C, text_dim=D)
    backbone = AnimateDiffBackbone(C, D, pretrained_path=str(root), motion_adapter_path=str(adapter_dir))
    expected = UNetMotionModel.from_unet2d(UNet2DConditionModel.from_pretrained(str(root / "unet")),
                                           MotionAdapter.from_pretrained(str(adapter_dir)))
    got, want = backbone.model.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    with pytest.raises(ValueError, match="motion_adapter_path"):  # the SD1.5 UNet alone has no motion modules
        AnimateDiffBackbone(C, D, pretrained_path=str(root))


def test_missing_or_incomplete_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AnimateDiffBackbone(C, D, pretrained_path=str(tmp_path / "nowhere"))
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNetMotionModel"}))
    with pytest.raises(FileNotFoundError, match="no weight file"):
        AnimateDiffBackbone(C, D, pretrained_path=str(tmp_path))
    (tmp_path / "unet" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing.*config.json"):
        AnimateDiffBackbone(C, D, pretrained_path=str(tmp_path))


def test_exactly_one_source_and_known_train_mode():
    with pytest.raises(ValueError, match="exactly one"):
        AnimateDiffBackbone(C, D)
    with pytest.raises(ValueError, match="exactly one"):
        AnimateDiffBackbone(C, D, pretrained_path="x", config=tiny_animatediff_config(C, D))
    with pytest.raises(ValueError, match="train_mode='spatial'"):
        AnimateDiffBackbone(C, D, config=tiny_animatediff_config(C, D), train_mode="spatial")


def test_channel_and_text_width_mismatch_name_both_values(tmp_path):
    root = save_tiny_animatediff(tmp_path)
    with pytest.raises(ValueError, match=r"in_channels=4.*in_channels=8"):
        AnimateDiffBackbone(8, D, pretrained_path=str(root))
    with pytest.raises(ValueError, match=r"cross_attention_dim=32.*text_dim=16"):
        AnimateDiffBackbone(C, 16, pretrained_path=str(root))


def test_bad_inputs_are_clear_errors():
    model = make_backbone()
    x, t, text, mask = inputs()
    with pytest.raises(ValueError, match=r"expected x of shape \(B, 4, F, H, W\)"):
        model(x[:, :3], t, text, mask)
    with pytest.raises(ValueError, match=r"expected text of shape \(2, L, 32\)"):
        model(x, t, text[..., :8], mask)
    with pytest.raises(ValueError, match="stride=0"):
        model(x, t, text, mask, stride=0)


@pytest.mark.parametrize("F,stride", [(1, 1), (2, 4), (4, 2), (8, 1), (16, 2)])
def test_output_has_input_shape(F, stride):
    model = make_backbone().eval()
    x, t, text, mask = inputs(B=1, F=F)
    with torch.no_grad():
        out = model(x, t, text, mask, stride=stride)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_strided_positions_keep_the_state_dict():
    torch.manual_seed(0)
    model = UNetMotionModel(**tiny_animatediff_config(C, D))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_original = sum(isinstance(m, SinusoidalPositionalEmbedding) for m in model.modules())
    installed = install_strided_positions(model)
    after = model.state_dict()
    assert len(installed) == n_original == 7  # 3 down/mid + 4 up motion modules in the tiny config
    assert after.keys() == before.keys()
    for key in before:
        assert torch.equal(after[key], before[key]), key
    assert install_strided_positions(model) == installed  # installing twice changes nothing


def test_positions_at_stride_one_are_bit_identical_and_strided_rows_otherwise():
    original = SinusoidalPositionalEmbedding(16, max_seq_length=32)
    strided = StridedSinusoidalPositionalEmbedding.from_module(original)
    x = torch.randn(6, 8, 16)  # (B·h·w, F, D)
    assert torch.equal(strided(x), original(x))
    for stride in (2, 3, 4):
        strided.stride = stride
        rows = torch.arange(4) * stride  # frames j = 0..3 sit at rows j·S
        assert torch.equal(strided(torch.zeros(6, 4, 16)), original.pe[:, rows].expand(6, -1, -1))
        assert torch.equal(strided(x[:, :4]), x[:, :4] + original.pe[:, rows])
    strided.stride = 4
    with pytest.raises(ValueError, match=r"position 32.*motion_max_seq_length=32"):
        strided(torch.zeros(6, 9, 16))  # frame 8 at stride 4 needs row 32 of a 32-row table


def test_whole_model_is_bit_identical_to_diffusers_at_stride_one():
    torch.manual_seed(0)
    reference = UNetMotionModel(**tiny_animatediff_config(C, D)).eval()
    model = make_backbone().eval()
    x, t, text, mask = inputs(F=8)
    with torch.no_grad():
        assert torch.equal(model(x, t, text, mask, stride=1),
                           reference(x, t, text.repeat_interleave(8, 0)).sample)
        assert not torch.equal(model(x, t, text, mask, stride=2), model(x, t, text, mask, stride=1))


def test_stride_reaches_every_motion_module_and_frames_are_not_padded():
    model = make_backbone().eval()
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append((mod.stride, args[0].shape[1])))
             for m in model.positions]
    x, t, text, mask = inputs(B=1, F=4)
    with torch.no_grad():
        model(x, t, text, mask, stride=4)
    for h in hooks:
        h.remove()
    # Each motion transformer block adds positions before both of its temporal self-attentions.
    assert len(seen) == 2 * len(model.positions)
    assert set(seen) == {(4, 4)}  # stride 4, and the 4-frame sequence itself (not upsampled to 16)


def test_shorter_stage_sequences_reach_the_unet():
    from tpdiff_lightning.models.text_encoder import T5TextEncoder
    from tpdiff_lightning.training.module import TPDiffModule

    text_encoder = T5TextEncoder(d_model=32, num_layers=1, num_heads=2, d_ff=32)
    module = TPDiffModule(backbone=partial(AnimateDiffBackbone, config=tiny_animatediff_config(3, 32)),
                          text_encoder=text_encoder, objective={"schedule": "ddim"}, clip={"num_frames": 8, "resolution": 16}, pyramid={"num_stages": 3}, optimization={"ema_decay": None})
    frames = []
    hook = module.backbone.model.conv_in.register_forward_hook(lambda m, args, out: frames.append(args[0].shape[0]))
    x0 = torch.randn(1, 3, 8, 16, 16)
    text, mask = text_encoder(["a square"])
    for i, stage in enumerate(module.pyramid.stages):
        loss = module.stage_loss(x0, text, mask, i, torch.Generator().manual_seed(i))
        assert torch.isfinite(loss)
        assert frames[-1] == stage.num_frames  # conv_in sees B·F_i frames, B = 1
        assert module.backbone.positions[0].stride == stage.stride
    hook.remove()
    assert frames == [2, 4, 8]


def test_motion_mode_trains_only_motion_modules():
    model = make_backbone(train_mode="motion")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("motion_modules" in n for n in trainable)
    assert trainable == {n for n, _ in model.named_parameters() if "motion_modules" in n}
    x, t, text, mask = inputs(B=1)
    model(x, t, text, mask, stride=2).square().mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and grads <= trainable
    full = make_backbone(train_mode="full")
    assert all(p.requires_grad for p in full.parameters())


def test_lora_trains_only_adapters_and_starts_at_the_base_model():
    base = make_backbone().eval()
    model = make_backbone(lora=LoraSettings(rank=4)).eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any("motion_modules" in n for n in trainable) and any("attentions" in n for n in trainable)
    assert len(lora_state_dict(model.model)) == len(trainable)
    x, t, text, mask = inputs(B=1)
    with torch.no_grad():  # peft's B matrices start at zero: the adapted model starts as the base
        assert_close(model(x, t, text, mask, stride=2), base(x, t, text, mask, stride=2))
    model(x, t, text, mask, stride=2).square().mean().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    with pytest.raises(ValueError, match="train_mode='motion' cannot be combined with LoRA"):
        make_backbone(train_mode="motion", lora=LoraSettings(rank=4))


def test_gradient_checkpointing_gives_the_same_output_and_grads_at_a_stride():
    plain = make_backbone().train()
    ckpt = make_backbone(gradient_checkpointing=True).train()
    assert ckpt.model.mid_block.gradient_checkpointing
    mid_motion = ckpt.model.mid_block.motion_modules[0]
    assert isinstance(mid_motion, AnimateDiffTransformer3D)
    calls = []
    mid_motion.register_forward_pre_hook(lambda m, args: calls.append(1))
    x, t, text, mask = inputs(B=1, F=4)
    outs = []
    for model in (plain, ckpt):
        out = model(x, t, text, mask, stride=4)
        out.square().mean().backward()
        outs.append(out.detach())
    # The mid block's motion module ran again in the backward pass, with the stride of its forward.
    assert len(calls) == 2
    assert_close(outs[1], outs[0])
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert_close(q.grad, p.grad, msg=name)


def test_set_temporal_stride_rejects_bad_values():
    model = make_backbone()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="expected a positive int"):
            set_temporal_stride(model.model, bad)


def test_fsdp_block_classes_cover_the_unet_stages():
    model = make_backbone()
    stages = [*model.model.down_blocks, model.model.mid_block, *model.model.up_blocks]
    from tpdiff_lightning.distributed.fsdp2 import block_classes

    assert all(isinstance(block, block_classes()) for block in stages)


def test_a_copy_keeps_its_own_strided_positions():
    model = make_backbone()
    copied = copy.deepcopy(model)  # as an EMA or a sharding wrapper may do
    set_temporal_stride(copied.model, 2)
    assert {p.stride for p in copied.positions} == {2} and {p.stride for p in model.positions} == {1}
    assert len(copied.positions) == 7 and copied.max_seq_length == 32


def test_yaml_factory_builds_it_from_a_folder(tmp_path):
    from typing import Callable

    from jsonargparse import ArgumentParser
    from torch import nn

    root = save_tiny_animatediff(tmp_path, in_channels=3, text_dim=16)
    parser = ArgumentParser()
    parser.add_argument("--backbone", type=Callable[[int, int], nn.Module])
    spec = {"class_path": "tpdiff_lightning.models.animatediff.AnimateDiffBackbone",
            "init_args": {"pretrained_path": str(root), "train_mode": "motion"}}
    factory = parser.instantiate(parser.parse_object({"backbone": spec})).backbone
    model = factory(3, 16)  # the module fills (in_channels, text_dim)
    assert isinstance(model, AnimateDiffBackbone) and model.train_mode == "motion"
    with pytest.raises(ValueError, match="in_channels=3.*in_channels=4"):
        factory(4, 16)


def test_bf16_autocast_forward_and_backward():
    model = make_backbone(train_mode="motion")
    x, t, text, mask = inputs(B=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, text, mask, stride=2)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
