"""A real ``fit`` on shards of mixed shapes (portrait, square, landscape; two lengths) with buckets and
token-budget batches: at least three buckets train, no clip is dropped for its shape, the budget holds at
every step, and the stage of each batch is the one drawn for its step."""

from __future__ import annotations

import json

import pytest

from tests.conftest import CALLBACK_SIZES, DEFAULT, callbacks_without_fvd, shrink_args

SHAPES = [(16, 32, 16), (16, 16, 16), (16, 16, 32), (8, 16, 16), (8, 16, 32)]  # (frames, height, width)
BUCKETS = [[16, 32, 16], [16, 16, 16], [16, 16, 32], [8, 16, 16]]
BUDGET = 128  # the default DiT's patch 8: a 16x16x16 clip is 64 tokens at full rate, 16 at stage 0


@pytest.mark.slow
def test_a_fit_on_mixed_shapes_trains_every_bucket_within_the_budget(tmp_path, one_thread):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tpdiff_lightning.cli.main import main
    from tpdiff_lightning.data.synthetic import write_synthetic_shards
    from tpdiff_lightning.method.token_budget import draw_stage

    root = tmp_path / "mixed"
    write_synthetic_shards(root, num_train=20, num_eval=4, num_frames=16, size=16, shapes=SHAPES, progress=False)
    steps = 12
    callbacks = [{**cb, "init_args": {**(cb.get("init_args") or {}), **CALLBACK_SIZES["ClipThroughput"]}}
                 if cb["class_path"].endswith("ClipThroughput") else cb for cb in callbacks_without_fvd()]
    cli = main(["fit", "--config", str(DEFAULT), *shrink_args(tmp_path / "out", root, max_steps=steps,
                                                               steps_per_epoch=steps, callbacks=callbacks),
                f"--data.init_args.buckets={json.dumps(BUCKETS)}", f"--data.init_args.token_budget={BUDGET}",
                "--data.init_args.build_synthetic=false", "--trainer.limit_val_batches=0",
                "--model.init_args.pyramid.stage_weights=null"])  # every stage drawn often enough in 12 steps
    assert cli.trainer.global_step == steps
    run = next((tmp_path / "out").rglob("events.out.tfevents.*")).parent
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()

    def scalars(tag):
        return {e.step: e.value for e in events.Scalars(tag)}
    buckets, tokens, clips, stages = (scalars(t) for t in ("data/bucket_index", "data/tokens_per_step",
                                                             "data/clips_per_step", "train/stage"))
    assert len(set(buckets.values())) >= 3, buckets  # portrait, square and landscape (and the short bucket) train
    assert all(0 < t <= BUDGET for t in tokens.values()), tokens
    plan = cli.datamodule.batch_plan()
    assert [stages[k] for k in sorted(stages)] == [draw_stage(plan.probabilities, 0, k) for k in range(steps)]
    mean_clips = [sum(v) / len(v) for s in range(3) if (v := [clips[k] for k in clips if stages[k] == s])]
    assert len(mean_clips) >= 2 and mean_clips == sorted(mean_clips, reverse=True), mean_clips  # more clips early
    accounting = next(c for c in cli.trainer.callbacks if type(c).__name__ == "ClipAccounting")
    assert len(accounting.lost_training_clips) == 0  # no clip dropped for its shape
    assert "data/buckets" in events.Tags()["histograms"]


@pytest.mark.slow
def test_a_latent_cache_per_bucket_keeps_every_clip_at_its_bucket_and_trains_on_every_bucket(tmp_path, one_thread):
    import torch
    import webdataset as wds
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.conftest import write_overlay
    from tpdiff_lightning.cli.encode_latents import main as encode_main
    from tpdiff_lightning.cli.main import main
    from tpdiff_lightning.data.synthetic import write_synthetic_shards
    from tpdiff_lightning.training.fit_checks import batch_plan_problems

    root, latents = tmp_path / "mixed", tmp_path / "latents"
    write_synthetic_shards(root, num_train=20, num_eval=4, num_frames=16, size=16, shapes=SHAPES, progress=False)
    overlay = write_overlay(tmp_path / "buckets.yaml", {"data": {"init_args": {
        "root": str(root), "build_synthetic": False, "num_frames": 16, "resolution": 16, "buckets": BUCKETS}}})
    manifest = encode_main(["--config", str(DEFAULT), "--config", str(overlay), "--out", str(latents)])
    train = manifest["splits"]["train"]
    assert train["num_clips"] == 20 and train["skipped"] == 0  # no clip dropped for its shape
    assert len(train["buckets"]) >= 3 and sum(train["buckets"].values()) == 20, train["buckets"]
    assert list(manifest["splits"]["eval"]["buckets"]) == ["16x16x16"]  # evaluation keeps its one shape
    for sample in wds.WebDataset(str(latents / "train-000000.tar"), shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        latent = torch.load(__import__("io").BytesIO(sample["latent.pth"]), weights_only=True)
        assert list(latent.shape[1:]) == meta["bucket"] and meta["bucket"] in BUCKETS  # identity codec

    steps = 6
    callbacks = [{**cb, "init_args": {**(cb.get("init_args") or {}), **CALLBACK_SIZES["ClipThroughput"]}}
                 if cb["class_path"].endswith("ClipThroughput") else cb for cb in callbacks_without_fvd()]
    args = ["fit", "--config", str(DEFAULT), *shrink_args(tmp_path / "out", latents, max_steps=steps,
                                                          steps_per_epoch=steps, callbacks=callbacks),
            f"--data.init_args.buckets={json.dumps(BUCKETS)}", f"--data.init_args.token_budget={BUDGET}",
            "--data.init_args.build_synthetic=false", "--trainer.limit_val_batches=0"]
    cli = main(args)
    assert cli.trainer.global_step == steps and cli.datamodule.resolved_format() == "latent"
    run = next((tmp_path / "out").rglob("events.out.tfevents.*")).parent
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    assert len({e.value for e in events.Scalars("data/bucket_index")}) >= 2
    assert all(0 < e.value <= BUDGET for e in events.Scalars("data/tokens_per_step"))
    accounting = next(c for c in cli.trainer.callbacks if type(c).__name__ == "ClipAccounting")
    assert len(accounting.lost_training_clips) == 0  # no latent clip dropped for its shape

    # Buckets that do not cover the cache, or none at all, are refused in one line before a step.
    narrow = main([*args[1:-4], f"--data.init_args.buckets={json.dumps(BUCKETS[:2])}",
                   "--data.init_args.build_synthetic=false"], run=False)
    (problem,) = batch_plan_problems(narrow.trainer, narrow.model, narrow.datamodule)
    assert problem.startswith("data.init_args.buckets=[[16, 32, 16], [16, 16, 16]] does not cover the latent "
                              "shards") and "16x16x32" in problem and "\n" not in problem
    plain = main([*args[1:-4], "--data.init_args.build_synthetic=false"], run=False)
    (problem,) = batch_plan_problems(plain.trainer, plain.model, plain.datamodule)
    assert problem.startswith("data.init_args.buckets=null, but the latent shards at") and "per bucket" in problem
