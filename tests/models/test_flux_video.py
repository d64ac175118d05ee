"""The frames-as-tokens Flux backbone: packing, position ids, loading, checks, text mask, LoRA, checkpointing."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from diffusers import FluxTransformer2DModel
from torch.testing import assert_close

from tests.helpers.tiny_flux import save_tiny_flux, tiny_flux_config
from tpdiff_lightning.models.flux_video import FluxVideoBackbone, image_ids, pack_frames, unpack_frames
from tpdiff_lightning.models.lora import LoraSettings

C, D = 4, 32


pytestmark = pytest.mark.usefixtures("one_thread")


def make_backbone(**kw) -> FluxVideoBackbone:
    config = tiny_flux_config(C, D, **kw.pop("config_kw", {}))
    torch.manual_seed(0)
    return FluxVideoBackbone(C, D, config=config, **kw)


def inputs(B: int = 2, F: int = 4, H: int = 8, W: int = 8, L: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, F, H, W, generator=g)
    t = torch.rand(B, generator=g) * 1000
    text = torch.randn(B, L, D, generator=g)
    return x, t, text, torch.ones(B, L, dtype=torch.bool)


def raw_call(model: FluxTransformer2DModel, x, t, text, stride=1):
    """The diffusers model called by hand the way the Flux pipeline calls it, frames as extra tokens."""
    B, _, F, H, W = x.shape
    return model(hidden_states=pack_frames(x), encoder_hidden_states=text, pooled_projections=text.mean(1),
                 timestep=t / 1000, img_ids=image_ids(F, H // 2, W // 2, stride),
                 txt_ids=torch.zeros(text.shape[1], 3)).sample


def test_packing_matches_the_flux_pipeline_per_frame_and_round_trips():
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    x = torch.randn(2, C, 3, 8, 6, dtype=torch.float64)
    tokens = pack_frames(x)
    assert tokens.shape == (2, 3 * 4 * 3, 4 * C)
    per_frame = tokens.view(2, 3, 4 * 3, 4 * C)  # frame-major
    for f in range(3):
        assert torch.equal(per_frame[:, f], FluxPipeline._pack_latents(x[:, :, f], 2, C, 8, 6))
    assert torch.equal(unpack_frames(tokens, 3, 8, 6), x)
    ids = image_ids(3, 4, 3)
    pipeline_ids = FluxPipeline._prepare_latent_image_ids(1, 4, 3, "cpu", torch.float32)
    assert torch.equal(ids[:12], pipeline_ids)  # frame 0 is the pipeline's image
    assert torch.equal(ids.view(3, 12, 3)[:, :, 1:], pipeline_ids[None, :, 1:].expand(3, -1, -1))


@pytest.mark.parametrize("F,stride", [(8, 1), (4, 2), (2, 4), (3, 3)])
def test_image_ids_put_frame_j_at_j_times_stride(F, stride):
    full = image_ids(F * stride, 4, 3).view(F * stride, 4, 3, 3)
    strided = image_ids(F, 4, 3, stride).view(F, 4, 3, 3)
    assert torch.equal(strided, full[::stride])  # the full-rate ids of frames 0, S, 2S, …
    assert torch.equal(strided[:, 0, 0, 0], torch.arange(F, dtype=torch.float32) * stride)


def test_loads_saved_folder_like_in_memory_model_and_matches_a_raw_call(tmp_path):
    root = save_tiny_flux(tmp_path, seed=3)
    torch.manual_seed(3)
    reference = FluxTransformer2DModel(**tiny_flux_config(C, D)).eval()
    loaded = FluxVideoBackbone(C, D, pretrained_path=str(root)).eval()
    direct = FluxVideoBackbone(C, D, pretrained_path=str(root / "transformer")).eval()
    x, t, text, mask = inputs()
    with torch.no_grad():
        expected = unpack_frames(raw_call(reference, x, t, text, stride=2), 4, 8, 8)
        assert_close(loaded(x, t, text, mask, stride=2), expected, rtol=0, atol=0)
        assert_close(direct(x, t, text, None, stride=2), expected, rtol=0, atol=0)


def test_missing_incomplete_or_foreign_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FluxVideoBackbone(C, D, pretrained_path=str(tmp_path / "nowhere"))
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(FileNotFoundError, match="no weight file"):
        FluxVideoBackbone(C, D, pretrained_path=str(tmp_path))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNetMotionModel"}))
    with pytest.raises(ValueError, match="'UNetMotionModel'; expected a FluxTransformer2DModel"):
        FluxVideoBackbone(C, D, pretrained_path=str(tmp_path))


def test_config_mismatches_name_both_values():
    with pytest.raises(ValueError, match="exactly one"):
        FluxVideoBackbone(C, D)
    with pytest.raises(ValueError, match=r"in_channels=16.*in_channels=8"):
        FluxVideoBackbone(8, D, config=tiny_flux_config(C, D))
    with pytest.raises(ValueError, match=r"joint_attention_dim=32.*text_dim=16"):
        FluxVideoBackbone(C, 16, config=tiny_flux_config(C, D))
    with pytest.raises(ValueError, match="guidance_embeds=True"):
        FluxVideoBackbone(C, D, config=tiny_flux_config(C, D, guidance_embeds=True))
    with pytest.raises(ValueError, match="patch_size=2"):
        FluxVideoBackbone(C, D, config=tiny_flux_config(C, D, patch_size=2))


def test_bad_inputs_are_clear_errors():
    model = make_backbone()
    x, t, text, mask = inputs()
    with pytest.raises(ValueError, match="H=7 and W=8 must both be even"):
        model(x[..., :7, :], t, text, mask)
    with pytest.raises(ValueError, match=r"expected text of shape \(2, L, 32\)"):
        model(x, t, text[..., :8], mask)
    with pytest.raises(ValueError, match="stride=0"):
        model(x, t, text, mask, stride=0)


@pytest.mark.parametrize("F,stride", [(1, 1), (2, 4), (4, 2), (8, 1)])
def test_output_has_input_shape(F, stride):
    model = make_backbone().eval()
    x, t, text, mask = inputs(B=1, F=F, H=8, W=12)
    with torch.no_grad():
        out = model(x, t, text, mask, stride=stride)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_stage_tokens_and_position_ids_reach_the_transformer():
    model = make_backbone().eval()
    seen = {}
    model.model.x_embedder.register_forward_hook(lambda m, args, out: seen.update(tokens=args[0].shape[1]))
    model.model.pos_embed.register_forward_hook(lambda m, args, out: seen.update(ids=args[0].clone()))
    x, t, text, mask = inputs(B=1, F=2, H=8, W=8, L=5)
    with torch.no_grad():
        at_4 = model(x, t, text, mask, stride=4)
        assert seen["tokens"] == 2 * 4 * 4  # F_i·h·w, not the full-rate count
        assert torch.equal(seen["ids"][:5], torch.zeros(5, 3))  # text ids
        assert torch.equal(seen["ids"][5:], image_ids(2, 4, 4, 4))
        assert not torch.equal(at_4, model(x, t, text, mask, stride=1))


def test_shorter_stage_sequences_reach_the_transformer():
    from tpdiff_lightning.models.text_encoder import T5TextEncoder
    from tpdiff_lightning.training.module import TPDiffModule

    text_encoder = T5TextEncoder(d_model=32, num_layers=1, num_heads=2, d_ff=32)
    module = TPDiffModule(backbone=partial(FluxVideoBackbone, config=tiny_flux_config(3, 32)),
                          text_encoder=text_encoder, objective={"schedule": "flow"}, clip={"num_frames": 8, "resolution": 8}, pyramid={"num_stages": 3}, optimization={"ema_decay": None})
    seen = []
    module.backbone.model.pos_embed.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    x0 = torch.randn(2, 3, 8, 8, 8)
    text, mask = text_encoder(["a square", "a red circle"])
    for i, stage in enumerate(module.pyramid.stages):
        assert torch.isfinite(module.stage_loss(x0, text, mask, i, torch.Generator().manual_seed(i)))
        img = seen[-1][text.shape[1]:]
        assert img.shape[0] == stage.num_frames * 4 * 4
        assert torch.equal(img[:, 0].unique(), torch.arange(stage.num_frames, dtype=torch.float32) * stage.stride)


def test_padded_text_tokens_are_ignored_and_real_ones_are_not():
    model = make_backbone().eval()
    x, t, text, _ = inputs(B=2, L=6)
    mask = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    changed_pad, changed_real = text.clone(), text.clone()
    changed_pad[1, 3:] += 5.0
    changed_real[1, 0] += 5.0
    with torch.no_grad():
        out = model(x, t, text, mask)
        assert_close(model(x, t, changed_pad, mask), out)
        assert not torch.allclose(model(x, t, changed_real, mask)[1], out[1])
        assert torch.equal(model(x, t, text, torch.ones(2, 6, dtype=torch.bool)), model(x, t, text, None))


def test_pooled_text_projection_when_widths_differ():
    model = make_backbone(config_kw={"pooled_projection_dim": 24})
    assert model.pool_proj is not None and model.pool_proj.out_features == 24
    x, t, text, mask = inputs(B=1)
    mask[0, 2:] = False
    assert torch.equal(model.pooled_text(text, mask), torch.zeros(1, 24))  # zero-initialised: neutral start
    model(x, t, text, mask).square().mean().backward()
    assert model.pool_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():  # once trained, the projection still sees only the real tokens' mean
        model.pool_proj.weight.normal_()
        padded = text.clone()
        padded[0, 2:] += 5.0
        assert_close(model(x, t, padded, mask), model(x, t, text, mask))
        assert_close(model.pooled_text(text, mask), model.pool_proj(text[:, :2].mean(1)))
    assert torch.equal(make_backbone().pooled_text(text, mask), text[:, :2].mean(1))


def test_lora_trains_only_adapters_and_starts_at_the_base_model():
    base = make_backbone().eval()
    model = make_backbone(lora=LoraSettings(rank=4)).eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    x, t, text, mask = inputs(B=1)
    with torch.no_grad():
        assert_close(model(x, t, text, mask, stride=2), base(x, t, text, mask, stride=2))
    model(x, t, text, mask, stride=2).square().mean().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_gradient_checkpointing_gives_the_same_output_and_grads():
    plain = make_backbone().train()
    ckpt = make_backbone(gradient_checkpointing=True).train()
    assert ckpt.model.gradient_checkpointing
    x, t, text, mask = inputs(B=1, F=4)
    mask[0, 3:] = False
    outs = []
    for model in (plain, ckpt):
        out = model(x, t, text, mask, stride=2)
        out.square().mean().backward()
        outs.append(out.detach())
    assert_close(outs[1], outs[0])
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert_close(q.grad, p.grad, msg=name)


def test_fsdp_block_classes_cover_the_transformer_blocks():
    model = make_backbone()
    blocks = [*model.model.transformer_blocks, *model.model.single_transformer_blocks]
    from tpdiff_lightning.distributed.fsdp2 import block_classes

    assert blocks and all(isinstance(b, block_classes()) for b in blocks)


def test_yaml_factory_builds_it_from_a_folder(tmp_path):
    from typing import Callable

    from jsonargparse import ArgumentParser
    from torch import nn

    root = save_tiny_flux(tmp_path, in_channels=3, text_dim=16)
    parser = ArgumentParser()
    parser.add_argument("--backbone", type=Callable[[int, int], nn.Module])
    spec = {"class_path": "tpdiff_lightning.models.flux_video.FluxVideoBackbone",
            "init_args": {"pretrained_path": str(root), "lora": {"rank": 2, "target_modules": ["to_q", "to_v"]}}}
    factory = parser.instantiate(parser.parse_object({"backbone": spec})).backbone
    model = factory(3, 16)  # the module fills (in_channels, text_dim)
    assert isinstance(model, FluxVideoBackbone)
    trained_layers = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trained_layers == {"to_q", "to_v"}


def test_bf16_autocast_forward_and_backward():
    model = make_backbone()
    x, t, text, mask = inputs(B=1)
    mask[0, 3:] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, text, mask, stride=2)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
