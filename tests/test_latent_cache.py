"""Latent shards: encode once, stream back, refuse a different codec, train from them."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import DEFAULT, TINY_DATA, shrink_args, write_overlay
from tpdiff_lightning.cli import main as cli_main
from tpdiff_lightning.data.datamodule import SkipCounter, VideoDataModule, collate_clips, eval_pipeline
from tpdiff_lightning.data.encode_latents import main as encode_main
from tpdiff_lightning.data.latent_cache import check_codec, module_identity
from tpdiff_lightning.models.codec import IdentityCodec
from tpdiff_lightning.models.text_encoder import T5TextEncoder
from tpdiff_lightning.module import TPDiffModule


def _overlay(tmp_path, data_root, frozen_text=False):
    cfg = {"data": {"init_args": {"root": str(data_root), "num_frames": TINY_DATA["num_frames"],
                                  "resolution": TINY_DATA["resolution"],
                                  "synthetic_num_train": TINY_DATA["synthetic_num_train"],
                                  "synthetic_num_eval": TINY_DATA["synthetic_num_eval"]}}}
    if frozen_text:
        cfg["model"] = {"init_args": {"text_encoder": {"class_path": "tpdiff_lightning.models.text_encoder.T5TextEncoder",
                                                       "init_args": {"trainable": False}}}}
    return write_overlay(tmp_path / "overlay.yaml", cfg)


@pytest.fixture()
def latent_root(tmp_path, tiny_data_root):
    out = tmp_path / "latents"
    manifest = encode_main(["--config", str(DEFAULT), "--config", str(_overlay(tmp_path, tiny_data_root)),
                            "--out", str(out), "--clips-per-shard", "10"])
    assert manifest["format"] == "latent" and manifest["text_encoder"] is None  # trainable T5: no cached text
    return out


def test_latent_shards_round_trip(latent_root, tiny_data_root):
    manifest = json.loads((latent_root / "manifest.json").read_text())
    assert manifest["splits"]["train"]["num_clips"] == TINY_DATA["synthetic_num_train"]
    assert len(manifest["splits"]["train"]["shards"]) == 3  # 24 clips, 10 per shard
    dm = VideoDataModule(root=str(latent_root), num_frames=16, resolution=16, batch_size=4, num_workers=0,
                         build_synthetic=False)
    assert dm.resolved_format() == "latent"
    latents = torch.cat([b["latent"] for b in dm.val_dataloader()])
    videos = torch.cat([b["video"] for b in eval_pipeline(
        VideoDataModule(root=str(tiny_data_root), build_synthetic=False).shard_urls("eval"), 16, 16, 4)])
    assert latents.shape == videos.shape == (TINY_DATA["synthetic_num_eval"], 3, 16, 16, 16)
    torch.testing.assert_close(latents, videos, atol=2e-3, rtol=0)  # identity codec, float16 storage
    batch = next(iter(dm.train_dataloader()))
    assert batch["latent"].shape == (4, 3, 16, 16, 16) and json.loads(batch["codec"])["name"] == "identity"


def test_another_codec_is_refused_clearly():
    class OtherCodec(IdentityCodec):
        name = "other"

    with pytest.raises(ValueError, match=r"encoded with codec .*'identity'.*model's codec is .*'other'"):
        check_codec(module_identity(IdentityCodec()), OtherCodec())


def test_a_batch_mixing_text_encoders_is_refused_naming_both():
    def sample(encoder: str) -> dict:
        return {"latent": torch.zeros(3, 4, 2, 2), "caption": "c", "codec": '{"name": "identity"}',
                "text_emb": torch.zeros(3, 8), "text_mask": torch.ones(3, dtype=torch.bool), "text_encoder": encoder}

    batch = collate_clips([sample('{"name": "t5"}'), sample('{"name": "t5"}')], SkipCounter())
    assert batch["text_encoder"] == '{"name": "t5"}' and batch["text_emb"].shape == (2, 3, 8)
    with pytest.raises(ValueError, match=r"2 text encoders.*clip.*t5"):
        collate_clips([sample('{"name": "t5"}'), sample('{"name": "clip"}')], SkipCounter())


def test_training_from_latent_batches_with_cached_text(tmp_path, tiny_data_root):
    out = tmp_path / "latents"
    manifest = encode_main(["--config", str(DEFAULT), "--config", str(_overlay(tmp_path, tiny_data_root, True)),
                            "--out", str(out), "--splits", "eval"])
    assert manifest["text_encoder"]["class"].endswith("T5TextEncoder")
    torch.manual_seed(0)
    module = TPDiffModule(num_frames=16, resolution=16, ema_decay=None, caption_dropout=0.5,
                          text_encoder=T5TextEncoder(trainable=False))
    dm = VideoDataModule(root=str(out), num_frames=16, resolution=16, batch_size=4, num_workers=0, build_synthetic=False)
    batch = next(iter(dm.val_dataloader()))
    assert "text_emb" in batch
    # Cached embeddings are used as they are: same tokens as encoding now, up to float16 storage.
    live, live_mask = module.text_encoder(batch["caption"])
    cached, cached_mask = module.batch_text(batch, batch["caption"])
    assert torch.equal(cached_mask, live_mask)
    torch.testing.assert_close(cached[cached_mask], live[live_mask], atol=0.02, rtol=0.01)
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss)
    # Embeddings from another text encoder are refused, not silently used.
    other = TPDiffModule(num_frames=16, resolution=16, ema_decay=None,
                         text_encoder=T5TextEncoder(d_model=64, num_heads=4, trainable=False))
    with pytest.raises(ValueError, match="caption embeddings of text encoder"):
        other.batch_text(batch, batch["caption"])


@pytest.mark.slow
def test_fit_from_latent_shards_through_the_cli(latent_root, tmp_path, tiny_data_root):
    cli = cli_main(["fit", "--config", str(DEFAULT), *shrink_args(tmp_path / "out", latent_root)])
    assert cli.trainer.global_step == 2
    assert cli.datamodule.resolved_format() == "latent"
