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
                "--data.init_args.build_synthetic=false", "--trainer.limit_val_batches=0"])
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
