"""The pretrained caption encoders: dims, masks, parity with the in-memory model, folders, freezing."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch.testing import assert_close

from tests.helpers.tiny_text import (
    save_tiny_clip,
    save_tiny_umt5,
    tiny_clip_model,
    tiny_clip_tokenizer,
    tiny_umt5_model,
    tiny_umt5_tokenizer,
    write_tiny_clip_tokenizer,
)
from tpdiff_lightning.models.pretrained_text import CLIPTextEncoder, UMT5TextEncoder, clean_caption
from tpdiff_lightning.models.text_encoder import TextEncoder

CAPTIONS = ["the red square moving left", "", "a blue circle"]


@pytest.fixture(scope="module")
def clip_root(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("sd15"), dim=32)


@pytest.fixture(scope="module")
def umt5_root(tmp_path_factory):
    return save_tiny_umt5(tmp_path_factory.mktemp("wan21"), dim=32)


def test_clip_dims_mask_and_empty_caption(clip_root):
    encoder = CLIPTextEncoder(str(clip_root))
    assert isinstance(encoder, TextEncoder) and encoder.dim == 32
    emb, mask = encoder(CAPTIONS)
    assert emb.shape == (3, 77, 32) and mask.shape == (3, 77) and mask.dtype == torch.bool
    assert mask.all()  # SD1.5 conditions on all 77 positions, padding included
    assert torch.isfinite(emb).all() and not torch.allclose(emb[0], emb[1])


def test_clip_matches_the_in_memory_model(clip_root, tmp_path):
    tokenizer = tiny_clip_tokenizer(tmp_path / "tokenizer")
    model = tiny_clip_model(len(tokenizer), dim=32)
    ids = tokenizer(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (3, 77)
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state  # (3, 77, 32)
    emb, _ = CLIPTextEncoder(str(clip_root))(CAPTIONS)
    assert_close(emb, expected)


def test_clip_from_one_folder_holding_model_and_tokenizer(clip_root, tmp_path):
    single = tmp_path / "clip"
    write_tiny_clip_tokenizer(single)
    shutil.copytree(clip_root / "text_encoder", single, dirs_exist_ok=True)
    emb, _ = CLIPTextEncoder(str(single))(CAPTIONS)
    assert_close(emb, CLIPTextEncoder(str(clip_root))(CAPTIONS)[0])


def test_clip_max_length_beyond_its_positions_is_an_error(clip_root):
    with pytest.raises(ValueError, match="max_length=78 .*77 positions"):
        CLIPTextEncoder(str(clip_root), max_length=78)


def test_umt5_dims_real_length_mask_and_zeroed_padding(umt5_root):
    encoder = UMT5TextEncoder(str(umt5_root), max_length=16)
    assert isinstance(encoder, TextEncoder) and encoder.dim == 32
    emb, mask = encoder(CAPTIONS)
    assert emb.shape == (3, 16, 32) and mask.shape == (3, 16) and mask.dtype == torch.bool
    # "the red square moving left": five words and the end token; "": the end token alone.
    assert mask.sum(1).tolist() == [6, 1, 4]
    assert (mask[:, :-1].int() >= mask[:, 1:].int()).all()  # real tokens first
    assert (emb[~mask] == 0).all() and (emb[mask].abs().sum(-1) > 0).all()


def test_umt5_pads_to_512_by_default(umt5_root):
    emb, mask = UMT5TextEncoder(str(umt5_root))([""])
    assert emb.shape == (1, 512, 32) and mask.sum().item() == 1


def test_umt5_matches_the_in_memory_model(umt5_root):
    tokenizer = tiny_umt5_tokenizer()
    model = tiny_umt5_model(len(tokenizer), dim=32)
    batch = tokenizer(CAPTIONS, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    expected = hidden * batch.attention_mask[..., None]  # (3, 16, 32), zero past each caption
    emb, mask = UMT5TextEncoder(str(umt5_root), max_length=16)(CAPTIONS)
    assert_close(emb, expected)
    assert torch.equal(mask, batch.attention_mask.bool())


def test_umt5_cleans_captions_as_wan_does(umt5_root):
    assert clean_caption("  a &amp;amp; b\n\t c ") == "a & b c"
    encoder = UMT5TextEncoder(str(umt5_root), max_length=16)
    assert_close(encoder(["  the red\n square "])[0], encoder(["the red square"])[0])


@pytest.mark.parametrize("encoder_cls", [CLIPTextEncoder, UMT5TextEncoder])
def test_encoders_are_frozen_and_checkpoint_free(encoder_cls, clip_root, umt5_root):
    root = clip_root if encoder_cls is CLIPTextEncoder else umt5_root
    encoder = encoder_cls(str(root), max_length=8)
    encoder.train()
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.parameters())
    with torch.enable_grad():
        emb, _ = encoder(["a red square"])
    assert not emb.requires_grad
    assert encoder.state_dict() == {}
    encoder.load_state_dict({}, strict=True)


@pytest.mark.parametrize("encoder_cls", [CLIPTextEncoder, UMT5TextEncoder])
def test_missing_folder_and_missing_tokenizer(encoder_cls, tmp_path):
    save = save_tiny_clip if encoder_cls is CLIPTextEncoder else save_tiny_umt5
    with pytest.raises(FileNotFoundError, match="no-such-folder.*does not exist"):
        encoder_cls(str(tmp_path / "no-such-folder"))
    root = save(tmp_path / "model")
    shutil.rmtree(root / "tokenizer")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer in .*model/tokenizer.* nor .*model'"):
        encoder_cls(str(root))
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer.json").write_text("not json")
    with pytest.raises(FileNotFoundError, match=r"tokenizer in .*model/tokenizer' does not load"):
        encoder_cls(str(root))


def test_missing_model_weights_are_an_error(clip_root, tmp_path):
    root = tmp_path / "sd15"
    shutil.copytree(clip_root, root)
    for weights in (root / "text_encoder").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(FileNotFoundError, match="text_encoder.*no weight file"):
        CLIPTextEncoder(str(root))


def test_captions_must_be_a_list_of_strings(clip_root):
    encoder = CLIPTextEncoder(str(clip_root))
    with pytest.raises(TypeError, match="list of caption strings, got 'a red square'"):
        encoder("a red square")
