"""What a resume may change: a part argument added to the code after a checkpoint was saved is the checkpoint's
training at the argument's default, not a change; any other value of it is refused in one line."""

from __future__ import annotations

import pytest

from tpdiff_lightning.runs.resume_settings import ResumeSettingsError, check_resume_settings, setting_changes

DIT = "tpdiff_lightning.models.dit.VideoDiT"


def settings(**backbone_args):
    return {"backbone": {"class_path": DIT, "init_args": {"size": "dit-tiny", **backbone_args}},
            "optimization": {"lr": 1e-3}}


def test_an_argument_the_checkpoint_predates_counts_as_its_default():
    stored = settings()  # saved before absolute_positions existed
    assert setting_changes(stored, settings(absolute_positions=False)) == {}
    assert setting_changes(stored, settings(absolute_positions=True)) == {
        "backbone.init_args.absolute_positions": (None, True)}
    with pytest.raises(ResumeSettingsError, match=r"absolute_positions=True \(the checkpoint has None\)"):
        check_resume_settings("last.ckpt", stored, settings(absolute_positions=True), None, None, ("optimization",),
                              "optimization.ema_decay")
    # A key the stored settings have is compared as before, default or not.
    assert setting_changes(settings(size="dit-s"), settings()) == {"backbone.init_args.size": ("dit-s", "dit-tiny")}
    # An unknown class path gives no default: a new key there is a change.
    unknown = {"backbone": {"class_path": "no.such.Module", "init_args": {}}}
    assert setting_changes(unknown, {"backbone": {"class_path": "no.such.Module", "init_args": {"x": 1}}}) == {
        "backbone.init_args.x": (None, 1)}
