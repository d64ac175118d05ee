"""A checkpoint written by release 0.1.0 (flat model settings, the module at ``tpdiff_lightning.module``) still loads
for predict, validate and a resumed fit, and gives the same clips (``tests/fixtures/flat_hparams/``)."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.conftest import DEFAULT, ROOT, shrink_args
from tpdiff_lightning.cli.main import main
from tpdiff_lightning.runs.checkpoint_match import CheckpointModelMismatchError
from tpdiff_lightning.training import TPDiffModule
from tpdiff_lightning.training.flat_settings import grouped
from tpdiff_lightning.training.module import to_uint8_video

FIXTURE = ROOT / "tests" / "fixtures" / "flat_hparams"
CHECKPOINT = FIXTURE / "release-0.1.0-step3.ckpt"
# How the fixture's run was configured beyond the default config (besides the tests' shrinking).
AS_TRAINED = ["--model.init_args.backbone.init_args.size=dit-nano", "--model.init_args.text_encoder.init_args.d_model=32",
              "--model.init_args.text_encoder.init_args.num_layers=1",
              "--model.init_args.text_encoder.init_args.num_heads=2",
              "--model.init_args.text_encoder.init_args.d_ff=64",
              # The default's settings at the release: relative positions only, stages drawn by partition.
              "--model.init_args.backbone.init_args.absolute_positions=false",
              "--model.init_args.pyramid.stage_weights=null",
              "--model.init_args.text_encoder.init_args.tokens=bytes"]  # the release's only tokens


def test_the_checkpoint_is_stored_flat():
    stored = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert stored["_class_path"] == "tpdiff_lightning.module.TPDiffModule" and stored["lr"] == 0.001
    assert "optimization" not in stored and stored["num_stages"] == 3


def test_load_from_checkpoint_reads_the_flat_settings_into_their_groups_and_generates_the_same_clips():
    module = TPDiffModule.load_from_checkpoint(CHECKPOINT, map_location="cpu")
    settings = module.settings
    assert settings.pyramid.num_stages == 3 and tuple(settings.pyramid.reductions) == (2, 2)
    assert settings.optimization.lr == 0.001 and settings.optimization.ema_decay == 0.995
    assert settings.sampling.steps == 5 and settings.sampling.guidance_scale == 2.0
    assert settings.clip.num_frames == 16 and settings.clip.resolution == 16
    reference = torch.load(FIXTURE / "generate_reference_float64.pt")
    clips = module.double().generate(reference["captions"], reference["seeds"], num_steps=reference["num_steps"])
    torch.testing.assert_close(clips, reference["video"], rtol=0, atol=1e-6)


def test_the_release_float32_clips_are_reproduced():
    module = TPDiffModule.load_from_checkpoint(CHECKPOINT, map_location="cpu")
    reference = torch.load(FIXTURE / "generate_reference.pt")
    clips = module.generate(reference["captions"], reference["seeds"], num_steps=reference["num_steps"])
    # float32 on another CPU rounds differently; stage coefficients moved from float32 tensors to Python floats
    # since the release (2.4e-7 here), so a float32 comparison is looser than the float64 one above.
    torch.testing.assert_close(clips, reference["video"], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_predict_validate_and_a_resumed_fit_take_the_flat_checkpoint(tmp_path, tiny_data_root, one_thread):
    out = tmp_path / "out"
    reference = torch.load(FIXTURE / "generate_reference.pt")
    prompts = "[" + ", ".join(reference["captions"]) + "]"
    cli = main(["predict", "--config", str(DEFAULT), *shrink_args(out, tiny_data_root), "--ckpt_path", str(CHECKPOINT),
                f"--data.init_args.predict_prompts={prompts}", "--data.init_args.batch_size=2",
                f"--model.init_args.sampling.steps={reference['num_steps']}", "--return_predictions=true"])
    assert cli.model.settings.pyramid.num_stages == 3 and cli.model.backbone.size == "dit-nano"  # the checkpoint's
    (prediction,) = cli.trainer.predict_loop.predictions
    expected = to_uint8_video(reference["video"])
    assert (prediction["video"].int() - expected.int()).abs().max() <= 1  # uint8 of the same clips
    cli = main(["validate", "--config", str(DEFAULT), *shrink_args(out, tiny_data_root), "--ckpt_path", str(CHECKPOINT)])
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    # A resumed fit: the run folder of a flat-release run, continued by this release.
    folder = out / "synthetic" / "tpdiff-flow" / "checkpoints"
    folder.mkdir(parents=True)
    shutil.copy(CHECKPOINT, folder / "epoch=0-step=3.ckpt")
    # The release read bytes; resumed under the default's word tokens it is refused, naming the setting.
    with pytest.raises(CheckpointModelMismatchError, match=r"text_encoder tokens 'bytes', config asks 'words'"):
        main(["fit", "--config", str(DEFAULT), *shrink_args(out, tiny_data_root, max_steps=5), *AS_TRAINED[:-1],
              "--ckpt_path", "last"])
    cli = main(["fit", "--config", str(DEFAULT), *shrink_args(out, tiny_data_root, max_steps=5), *AS_TRAINED,
                "--ckpt_path", "last"])
    assert cli.trainer.global_step == 5 and int(cli.model.ema.num_updates) == 5  # continued from step 3
    stored = torch.load(folder / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert stored["optimization"]["lr"] == 0.001 and "lr" not in stored  # saved the grouped way from now on


def test_checkpoints_from_before_word_tokens_read_as_bytes():
    t5 = "tpdiff_lightning.models.text_encoder.T5TextEncoder"
    old = grouped({"text_encoder": {"class_path": t5, "init_args": {"d_model": 32}}})
    assert old["text_encoder"]["init_args"] == {"d_model": 32, "tokens": "bytes", "word_buckets": 4096}
    new = {"text_encoder": {"class_path": t5, "init_args": {"d_model": 32, "tokens": "words", "word_buckets": 64}}}
    assert grouped(new) == new
    clip = {"text_encoder": {"class_path": "tpdiff_lightning.models.pretrained_text.CLIPTextEncoder",
                             "init_args": {"pretrained_path": "x"}}}
    assert grouped(clip) == clip


def test_checkpoints_from_before_absolute_positions_keep_relative_positions_only():
    dit = "tpdiff_lightning.models.dit.VideoDiT"
    old = grouped({"backbone": {"class_path": dit, "init_args": {"size": "dit-nano"}}})
    assert old["backbone"]["init_args"] == {"size": "dit-nano", "absolute_positions": False}
    new = {"backbone": {"class_path": dit, "init_args": {"size": "dit-nano", "absolute_positions": True}}}
    assert grouped(new) == new
    # Predicting a release checkpoint under the default config (absolute positions on) builds the model it trained.
    module = TPDiffModule.load_from_checkpoint(CHECKPOINT, map_location="cpu")
    assert module.backbone.absolute_positions is None
