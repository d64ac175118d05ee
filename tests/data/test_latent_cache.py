"""Latent shards: encode once, stream back, refuse a different codec, train from them."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
import webdataset as wds

from tests.conftest import DEFAULT, TINY_DATA, shrink_args, write_overlay
from tpdiff_lightning.cli.encode_latents import main as encode_main
from tpdiff_lightning.cli.main import main as cli_main
from tpdiff_lightning.data import decoding, pipelines
from tpdiff_lightning.data.collation import collate_clips
from tpdiff_lightning.data.datamodule import VideoDataModule
from tpdiff_lightning.data.decoding import NoUsableClipsError
from tpdiff_lightning.data.latent_cache import (check_codec, check_text_encoder, encode_split, module_identity,
                                                tensor_bytes)
from tpdiff_lightning.data.lost_clips import CorruptSampleWarning, SkipCounter
from tpdiff_lightning.data.pipelines import eval_pipeline, train_pipeline
from tpdiff_lightning.data.synthetic import read_manifest
from tpdiff_lightning.data.video_io import ClipLengthError
from tpdiff_lightning.models.codec import IdentityCodec
from tpdiff_lightning.models.text_encoder import T5TextEncoder
from tpdiff_lightning.training.module import TPDiffModule


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
    assert manifest["splits"]["train"]["shard_clips"] == [10, 10, 4]
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
    module = TPDiffModule(clip={"num_frames": 16, "resolution": 16}, optimization={"ema_decay": None}, objective={"caption_dropout": 0.5},
                          text_encoder=T5TextEncoder(trainable=False, tokens="words"))  # as configs/default.yaml
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
    other = TPDiffModule(clip={"num_frames": 16, "resolution": 16}, optimization={"ema_decay": None},
                         text_encoder=T5TextEncoder(d_model=64, num_heads=4, trainable=False))
    with pytest.raises(ValueError, match="caption embeddings of text encoder"):
        other.batch_text(batch, batch["caption"])
    # The same width on other tokens (bytes, not the words they were encoded with) is another encoder too.
    on_bytes = TPDiffModule(clip={"num_frames": 16, "resolution": 16}, optimization={"ema_decay": None},
                            text_encoder=T5TextEncoder(trainable=False, tokens="bytes"))
    with pytest.raises(ValueError, match="caption embeddings of text encoder.*'tokens': 'words'"):
        on_bytes.batch_text(batch, batch["caption"])


def test_shards_from_before_word_tokens_count_as_bytes():
    stored = {"class": "tpdiff_lightning.models.text_encoder.T5TextEncoder", "dim": 128}
    check_text_encoder(stored, T5TextEncoder(trainable=False, tokens="bytes"))
    with pytest.raises(ValueError, match="caption embeddings of text encoder"):
        check_text_encoder(stored, T5TextEncoder(trainable=False, tokens="words"))
    words = module_identity(T5TextEncoder(trainable=False, tokens="words"))
    with pytest.raises(ValueError, match="'word_buckets': 64"):  # other hash buckets: other word ids
        check_text_encoder(words, T5TextEncoder(trainable=False, tokens="words", word_buckets=64))


@pytest.mark.slow
def test_fit_from_latent_shards_through_the_cli(latent_root, tmp_path, tiny_data_root):
    cli = cli_main(["fit", "--config", str(DEFAULT), *shrink_args(tmp_path / "out", latent_root)])
    assert cli.trainer.global_step == 2
    assert cli.datamodule.resolved_format() == "latent"


def _video_batches(num_batches: int, batch_size: int = 2, num_frames: int = 4) -> list[dict]:
    """Batches of distinct tiny clips (B, 3, F, 4, 4) as `eval_pipeline` yields them."""
    return [{"video": torch.full((batch_size, 3, num_frames, 4, 4), 0.1 * i), "num_skipped": torch.tensor(0),
             "caption": [f"clip {i}.{b}" for b in range(batch_size)]} for i in range(num_batches)]


def test_reencoding_a_split_lists_and_keeps_only_this_runs_shards(tmp_path):
    out = tmp_path / "latents"
    first = encode_split(IdentityCodec(), None, _video_batches(3), out, "train", clips_per_shard=2)
    assert first["shards"] == [f"train-{i:06d}.tar" for i in range(3)]
    (out / "eval-000000.tar").write_bytes(b"another split's shard")
    second = encode_split(IdentityCodec(), None, _video_batches(3), out, "train", clips_per_shard=256)
    assert second == {"shards": ["train-000000.tar"], "num_clips": 6, "shard_clips": [6], "skipped": 0,
                      "buckets": {"4x4x4": 6}}
    assert sorted(p.name for p in out.glob("*.tar")) == ["eval-000000.tar", "train-000000.tar"]
    samples = list(wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False, empty_check=False))
    assert len(samples) == 6


def test_latent_stream_without_enough_latent_frames_raises_naming_them(tmp_path, monkeypatch):
    monkeypatch.setattr(pipelines, "MAX_SHORT_BEFORE_FIRST_CLIP", 6)
    encode_split(IdentityCodec(), None, _video_batches(2, num_frames=4), tmp_path, "train", clips_per_shard=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptSampleWarning)
        with pytest.raises(NoUsableClipsError, match=r"span of 8 latent frames .*num_frames=8.*4 latent frames"):
            next(iter(train_pipeline([str(tmp_path / "train-000000.tar")], 8, 4, 2, shuffle_buffer=2,
                                     sample_format="latent")))


def test_latents_encoded_at_another_length_are_named_as_such_not_as_too_short():
    tally = decoding.ShortClipTally()
    for _ in range(3):
        tally.add(ClipLengthError("x", frames=33, num_frames=17, unit="encoded video frames", exact=True), "a.tar")
    message = str(tally.error())
    assert "encoded from 33 encoded video frames (3 samples)" in message and "exactly num_frames=17" in message
    assert "Re-encode" in message and "long enough" not in message


def test_encoding_refuses_to_write_over_the_shards_it_reads(tmp_path, tiny_data_root):
    source = tmp_path / "source"
    shutil.copytree(tiny_data_root, source)
    before = {p.name: p.stat().st_size for p in source.iterdir()}
    shards = {"data": {"init_args": {"train_shards": str(source / "train-000000.tar"),
                                     "eval_shards": str(source / "eval-000000.tar"), "build_synthetic": False}}}
    overlay = write_overlay(tmp_path / "shards.yaml", shards)
    with pytest.raises(SystemExit, match="holds shards this run reads"):
        encode_main(["--config", str(DEFAULT), "--config", str(_overlay(tmp_path, tiny_data_root)),
                     "--config", str(overlay), "--out", str(source)])
    assert {p.name: p.stat().st_size for p in source.iterdir()} == before  # nothing deleted or truncated


def test_encoding_that_yields_no_clip_fails_without_a_manifest(tmp_path, tiny_data_root):
    longer = write_overlay(tmp_path / "longer.yaml", {"data": {"init_args": {"num_frames": 32, "build_synthetic": False}}})
    out = tmp_path / "latents"
    with pytest.raises(SystemExit, match=r"no clips were encoded for \['eval', 'train'\]"):
        encode_main(["--config", str(DEFAULT), "--config", str(_overlay(tmp_path, tiny_data_root)),
                     "--config", str(longer), "--out", str(out)])
    assert not (out / "manifest.json").exists()


def test_encoding_checks_every_split_before_encoding_any(tmp_path, tiny_data_root):
    real = tmp_path / "real"  # a dataset with a train split only, as data/build_openvid.py writes one
    real.mkdir()
    shards = [str(tiny_data_root / name) for name in read_manifest(tiny_data_root)["splits"]["train"]["shards"]]
    (real / "manifest.json").write_text(json.dumps(
        {"generator": "tpdiff_lightning.data.openvid", "splits": {"train": {"shards": shards, "num_clips": 24}}}))
    out = tmp_path / "latents"
    with pytest.raises(SystemExit, match=rf"split 'eval': {real}.*it has \['train'\].*nothing was encoded"):
        encode_main(["--config", str(DEFAULT), "--config", str(_overlay(tmp_path, real)), "--out", str(out)])
    assert not out.exists() or not any(out.iterdir())


def _latent_sample(bucket=None):
    meta = {"codec": module_identity(IdentityCodec()), "num_frames": 4}
    if bucket is not None:
        meta["bucket"] = bucket
    return {"__key__": "k", "__url__": "u.tar", "latent.pth": tensor_bytes(torch.zeros(3, 4, 8, 8)),
            "txt": b"a red circle moving left slow", "json": json.dumps(meta).encode()}


def test_a_latent_clip_keeps_its_bucket_and_one_the_run_lacks_stops_the_stream():
    from tpdiff_lightning.data.buckets import Bucket
    from tpdiff_lightning.data.latent_cache import (LatentBucketError,
                                                    decode_latent)

    buckets = [Bucket(4, 8, 8), Bucket(8, 8, 16)]
    clip = decode_latent(_latent_sample([4, 8, 8]), 99, rng=None, buckets=buckets)
    assert clip["bucket"] == Bucket(4, 8, 8) and clip["latent"].shape == (3, 4, 8, 8)
    for sample, why in ((_latent_sample([4, 16, 8]), "not one of data.init_args.buckets"),
                        (_latent_sample(), "no bucket in its metadata")):
        with pytest.raises(LatentBucketError, match=why):
            decode_latent(sample, 4, rng=None, buckets=buckets)
        # In the stream it is not skipped like a damaged sample (which would skip every clip forever): it stops.
        stage = decoding.DecodeClips(SkipCounter(), 4, 1, 8, random_start=False, sample_format="latent",
                                     buckets=buckets)
        with pytest.raises(LatentBucketError):
            list(stage(iter([sample])))


def test_a_latent_cache_of_another_shape_is_refused_before_the_run_in_one_line(tmp_path):
    from tpdiff_lightning.data.shard_records import write_json_atomic
    from tpdiff_lightning.training.fit_checks import latent_bucket_problems

    write_json_atomic(tmp_path / "manifest.json", {"format": "latent", "splits": {"train": {
        "shards": ["train-000000.tar"], "num_clips": 4, "buckets": {"16x16x32": 4}}}})
    data = VideoDataModule(root=str(tmp_path), num_frames=16, resolution=16, build_synthetic=False)
    (problem,) = latent_bucket_problems(data, None)
    assert problem.startswith("data.init_args.resolution=16, but the latent shards at") and "16x32" in problem
    assert latent_bucket_problems(VideoDataModule(root=str(tmp_path), num_frames=16, resolution=[16, 32],
                                                  build_synthetic=False), None) == []
    budget = VideoDataModule(root=str(tmp_path), num_frames=16, resolution=16, build_synthetic=False, token_budget=64)
    (problem,) = latent_bucket_problems(budget, ["16x16x16"])
    assert problem.startswith("data.init_args.token_budget=64 (one shape, 16x16x16) does not cover") and "\n" not in problem
