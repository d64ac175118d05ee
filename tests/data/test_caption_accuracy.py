"""The synthetic caption check (colour and direction of motion) on the dataset's own clips and on clips that
break it, and the training FLOP meter it is plotted against."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tpdiff_lightning.data.synthetic import clip_rng, make_clip
from tpdiff_lightning.data.caption_accuracy import caption_accuracy, caption_factors
from tpdiff_lightning.training.flop_meter import FlopMeter, step_kind


def real_clips(count: int = 16):
    clips, captions = [], []
    for i in range(count):
        frames, caption, _ = make_clip(clip_rng(0, "eval", i), 16, 32)
        clips.append(frames)
        captions.append(caption)
    return clips, captions


def test_the_dataset_s_own_clips_are_right_every_time_and_broken_ones_are_not():
    clips, captions = real_clips()
    result = caption_accuracy(clips, captions)
    assert result["colour_accuracy"] == 1.0 and result["direction_accuracy"] == 1.0
    assert result["colour_chance"] == 0.25 and result["direction_chance"] == 0.25
    backwards = caption_accuracy([c[::-1] for c in clips], captions)  # played backwards: the opposite direction
    assert backwards["direction_accuracy"] == 0.0 and backwards["colour_accuracy"] == 1.0
    still = caption_accuracy([np.repeat(c[:1], len(c), 0) for c in clips], captions)  # a shape that does not move
    assert still["direction_accuracy"] == 0.0 and still["colour_accuracy"] == 1.0
    swapped = [c.replace("red", "TMP").replace("blue", "red").replace("TMP", "blue") for c in captions]
    assert caption_accuracy(clips, swapped)["colour_accuracy"] < 1.0


def test_a_caption_that_names_no_colour_or_direction_is_one_clear_error():
    assert caption_factors("a red circle moving left fast") == ("red", "left")
    with pytest.raises(ValueError, match="caption 'a cat on a mat' names no palette colour and direction"):
        caption_factors("a cat on a mat")


def test_the_flop_meter_counts_each_kind_of_step_once_and_adds_it_every_time():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    meter = FlopMeter()
    for key in ("stage0", "stage0", "stage1"):
        meter.begin(key)
        a @ b if key == "stage0" else torch.cat([a, a]) @ b
        meter.end(world_size=2)
    one = 2 * 8 * 16 * 4
    assert meter.per_step == {"stage0": one, "stage1": 2 * one}
    assert meter.total == 2 * (one + one + 2 * one)  # two ranks' worth of each step
    resumed = FlopMeter(meter.total)  # a resumed run counts its first step of each kind again
    resumed.begin("stage0")
    a @ b
    resumed.end()
    assert resumed.total == meter.total + one


def test_a_steps_kind_is_its_stage_and_its_pixel_or_latent_batch_shape():
    class Module:
        def batch_stage(self, batch, batch_idx):
            return int(batch.get("stage", 7))

    latent = {"latent": torch.zeros(6, 16, 5, 4, 4), "stage": 1}
    assert step_kind(Module(), latent, 0) == (1, (6, 16, 5, 4, 4))  # latent shards: the latents' shape
    assert step_kind(Module(), {"video": torch.zeros(2, 3, 8, 16, 16)}, 0) == (7, (2, 3, 8, 16, 16))
