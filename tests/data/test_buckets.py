"""Buckets by shape and token-budget batches: the bucket choice, the pyramid's divisibility at every stage, the
budget never exceeded, no clip lost, and the stage of each batch drawn from its step."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import DEFAULT, shrink_args
from tpdiff_lightning.data.buckets import Bucket, equal_area_buckets, nearest_bucket, parse_buckets
from tpdiff_lightning.data.decoding import clip_shape, decode_bucketed_clip
from tpdiff_lightning.data.synthetic import write_synthetic_shards
from tpdiff_lightning.data.token_batches import BatchPlan, TokenBudgetBatches
from tpdiff_lightning.data.video_io import encode_mp4, mp4_shape
from tpdiff_lightning.method.token_budget import draw_stage


def test_equal_area_buckets_have_sides_of_the_multiple_and_about_the_area():
    buckets = equal_area_buckets((480, 832), [49, 81], 16)
    assert {b.frames for b in buckets} == {49, 81} and len(buckets) == 10
    for b in buckets:
        assert b.height % 16 == 0 and b.width % 16 == 0
        assert 0.85 < b.height * b.width / (480 * 832) < 1.15
    aspects = sorted({round(b.aspect, 1) for b in buckets})
    assert aspects[0] <= 0.6 and aspects[-1] >= 1.7  # portrait to landscape


def test_a_clip_goes_to_the_nearest_aspect_among_the_buckets_it_covers():
    buckets = [Bucket(16, 32, 16), Bucket(16, 16, 16), Bucket(16, 16, 32), Bucket(8, 16, 32)]
    assert nearest_bucket(40, 1280, 720, buckets) == Bucket(16, 32, 16)  # portrait
    assert nearest_bucket(40, 720, 1280, buckets) == Bucket(16, 16, 32)  # landscape, the longest of equals
    assert nearest_bucket(10, 720, 1280, buckets) == Bucket(8, 16, 32)  # too short for 16 frames
    assert nearest_bucket(10, 1280, 720, buckets) == Bucket(8, 16, 32)  # only the short bucket is covered
    assert nearest_bucket(20, 720, 1280, buckets, frame_step=2) == Bucket(8, 16, 32)  # 16 frames at step 2: 31
    assert nearest_bucket(7, 720, 1280, buckets) is None


def test_bad_buckets_are_one_line_naming_the_entry():
    with pytest.raises(ValueError, match=r"buckets\[1\]=\[16, 0, 32\] is invalid; expected \[frames, height, width\]"):
        parse_buckets([[16, 16, 16], [16, 0, 32]])
    with pytest.raises(ValueError, match="lists a shape twice"):
        parse_buckets([[16, 16, 16], [16, 16, 16]])


def test_the_shape_is_read_from_the_json_or_the_mp4_header():
    frames = np.zeros((6, 8, 12, 3), dtype=np.uint8)
    mp4 = encode_mp4(frames)
    assert mp4_shape(mp4) == (6, 8, 12)
    assert clip_shape({"mp4": mp4}) == (6, 8, 12)
    assert clip_shape({"mp4": mp4, "json": json.dumps({"num_frames": 6, "height": 8, "width": 12})}) == (6, 8, 12)


def test_a_portrait_clip_decodes_at_its_portrait_bucket(tmp_path):
    write_synthetic_shards(tmp_path, num_train=3, num_eval=1, shapes=[(9, 24, 12), (9, 12, 12), (5, 12, 24)],
                           progress=False)
    import webdataset as wds

    samples = list(wds.WebDataset(str(tmp_path / "train-000000.tar"), shardshuffle=False))
    buckets = [Bucket(8, 16, 8), Bucket(8, 8, 8), Bucket(4, 8, 16)]
    got = [decode_bucketed_clip(s, buckets, 1, None) for s in samples]
    assert [c["bucket"] for c in got] == buckets
    assert [tuple(c["video"].shape) for c in got] == [(3, 8, 16, 8), (3, 8, 8, 8), (3, 4, 8, 16)]


def fake_clips(buckets, n, seed=0):
    rng = np.random.default_rng(seed)
    for k in range(n):
        b = buckets[rng.integers(len(buckets))]
        yield {"bucket": b, "caption": f"clip {k}", "video": torch.zeros(1), "key": str(k)}


def collate(clips):
    assert len({c["bucket"] for c in clips}) == 1  # one bucket per batch
    return {"caption": [c["caption"] for c in clips], "video": torch.stack([c["video"] for c in clips])}


def plan(stage_aware=True, budget=256):
    buckets = [Bucket(16, 16, 16), Bucket(16, 16, 32), Bucket(8, 16, 16)]
    tokens = {buckets[0]: (16, 32, 64), buckets[1]: (32, 64, 128), buckets[2]: (8, 16, 32)}
    return BatchPlan(tokens, budget, (1.0, 1.0, 1.0), buckets[0], tokens[buckets[0]], stage_aware, stage_seed=5)


@pytest.mark.parametrize("stage_aware", [True, False])
def test_token_batches_keep_the_budget_lose_no_clip_and_follow_the_drawn_stage(stage_aware):
    p = plan(stage_aware)
    batcher = TokenBudgetBatches(p, collate, first_step=100, batches_per_worker=10 ** 6)
    batches = list(batcher(fake_clips(list(p.stage_tokens), 3000)))
    yielded = sum(len(b["caption"]) for b in batches)
    buffered = 3000 - yielded
    assert 0 <= buffered <= batcher.max_buffer  # what was not batched yet still waits in the buffer
    assert len({c for b in batches for c in b["caption"]}) == yielded  # no clip twice
    for k, b in enumerate(batches):
        assert b["tokens"] <= p.budget
        stage = draw_stage(p.probabilities, 5, 100 + k) if stage_aware else None
        assert b.get("stage") == stage
        bucket = list(p.stage_tokens)[b["bucket_index"]]
        assert len(b["caption"]) == p.clips(bucket, stage)  # full batches: the buffer never overflowed here
    if stage_aware:  # the cheap stages hold more clips per batch
        sizes = {s: {len(b["caption"]) for b in batches if b["stage"] == s and b["bucket_index"] == 0} for s in range(3)}
        assert sizes == {0: {16}, 1: {8}, 2: {4}}


def test_a_full_buffer_sends_its_fullest_bucket_under_budget():
    p = plan(budget=4096)  # 256 clips per stage-0 batch of the small bucket: the buffer fills first
    batcher = TokenBudgetBatches(p, collate, first_step=0, batches_per_worker=10 ** 6, max_buffer=50)
    batches = list(batcher(fake_clips(list(p.stage_tokens), 500)))
    assert batches and all(len(b["caption"]) <= 51 for b in batches)
    assert all(b["tokens"] <= p.budget for b in batches)


def test_every_bucket_of_an_equal_area_set_fits_every_stage_and_a_bad_one_is_named(tiny_data_root):
    from tpdiff_lightning.cli.main import main

    cli = main(["--config", str(DEFAULT), *shrink_args(tiny_data_root, tiny_data_root), "--trainer.logger=false",
                "--trainer.accelerator=cpu"], run=False)
    module = cli.model
    patch = module.backbone.patch_size
    buckets = equal_area_buckets((16, 16), [16, 8], multiple=patch)
    p = module.batch_plan(buckets, 256, True)
    for bucket in buckets:
        pyramid = module.pyramid_for(module.latent_frames(bucket.frames))
        for stage, tokens in zip(pyramid.stages, p.stage_tokens[bucket]):  # whole patches at every stage
            assert tokens == stage.num_frames * (bucket.height // patch) * (bucket.width // patch)
    with pytest.raises(ValueError, match=r"^data.init_args.buckets\[1\]=\[16, 16, 12\] does not fit the pyramid: "
                                         r"expected height divisible by 8 and width by 8"):
        module.batch_plan([Bucket(16, 16, 16), Bucket(16, 16, 12)], 256, True)
    with pytest.raises(ValueError, match=r"^data.init_args.buckets\[0\]=\[6, 16, 16\] does not fit the pyramid"):
        module.batch_plan([Bucket(6, 16, 16)], 256, True)


def test_fit_refuses_a_bucket_the_pyramid_cannot_take_and_global_alignment_with_token_batches(tiny_data_root):
    from tpdiff_lightning.cli.main import main
    from tpdiff_lightning.training.fit_checks import fit_setup_problems

    def problems(*extra: str) -> list[str]:
        cli = main(["--config", str(DEFAULT), *shrink_args(tiny_data_root, tiny_data_root), "--trainer.logger=false",
                    "--trainer.accelerator=cpu", *extra], run=False)
        return fit_setup_problems(cli.trainer, cli.model, cli.datamodule)

    assert problems("--data.init_args.buckets=[[16, 16, 16], [8, 16, 32]]", "--data.init_args.token_budget=256") == []
    (line,) = problems("--data.init_args.buckets=[[16, 16, 16], [16, 20, 16]]")
    assert line.startswith("data.init_args.buckets[1]=[16, 20, 16] does not fit the pyramid")
    (line,) = problems("--data.init_args.token_budget=256", "--trainer.devices=2", "--trainer.strategy=ddp",
                       "--model.init_args.objective.alignment_scope=global")
    assert "alignment_scope=global cannot run with data.init_args.buckets or token_budget" in line


def test_batches_by_bucket_yield_every_clip_once_in_batches_of_one_bucket():
    from tpdiff_lightning.data.pipelines import batches_by_bucket

    shapes = [Bucket(16, 32, 16), Bucket(16, 16, 16), Bucket(8, 16, 16)]
    clips = [{"bucket": shapes[i % 3 if i < 12 else 0], "id": i} for i in range(17)]  # 9, 4, 4 clips
    batches = list(batches_by_bucket(3, lambda group: list(group))(iter(clips)))
    assert sorted(c["id"] for b in batches for c in b) == list(range(17))
    assert all(len({c["bucket"] for c in b}) == 1 and 1 <= len(b) <= 3 for b in batches)
    assert sorted(len(b) for b in batches) == [1, 1, 3, 3, 3, 3, 3]  # 9 = 3+3+3, 4 = 3+1 twice
