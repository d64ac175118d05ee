"""The model's settings groups as users meet them: in ``fit --help``, and as one line when a config still uses a
flat key of release 0.1.0 or a class that moved."""

from __future__ import annotations

import pytest

from tests.conftest import DEFAULT
from tpdiff_lightning.cli.main import command_line, main


def test_fit_help_lists_every_model_setting_with_its_meaning(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    help_text = capsys.readouterr().out
    for key, words in (("pyramid.num_stages", "Number of stages K"), ("optimization.lr", "Peak learning rate"),
                       ("objective.flow_velocity", "velocity in global time"), ("sampling.step_weights", "PyramidalWan"),
                       ("clip.num_frames", "linked from")):
        line = next(line for line in help_text.splitlines() if f"--model.init_args.{key} " in line)
        assert words in line, line


def _one_line(capsys, argv) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        command_line(argv)
    assert stop.value.code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    return lines[0]


@pytest.mark.parametrize("yaml_text, expected", [
    ("model:\n  init_args:\n    lr: 0.01\n", "model.init_args.lr moved to model.init_args.optimization.lr"),
    ("model:\n  init_args:\n    sample_steps: 10\n", "model.init_args.sample_steps moved to model.init_args.sampling.steps"),
    ("model:\n  class_path: tpdiff_lightning.module.TPDiffModule\n",
     "class_path tpdiff_lightning.module.TPDiffModule moved to tpdiff_lightning.training.module.TPDiffModule"),
    ("trainer:\n  strategy:\n    class_path: tpdiff_lightning.parallel.FSDP2Strategy\n",
     "moved to tpdiff_lightning.distributed.fsdp2.FSDP2Strategy"),
])
def test_a_users_old_yaml_gets_one_line_saying_where_the_setting_went(tmp_path, capsys, yaml_text, expected):
    old = tmp_path / "mine.yaml"
    old.write_text(yaml_text)
    line = _one_line(capsys, ["fit", "--config", str(DEFAULT), "--config", str(old)])
    assert expected in line and str(old) in line, line
    assert "Given value" not in line and "Namespace(" not in line  # no parser dump


def test_a_null_for_one_field_of_a_group_is_taken(tmp_path, tiny_data_root):
    """jsonargparse reads such a null as the string "None"; the CLI gives it the group form it merges."""
    from tests.conftest import shrink_args

    cli = main(["--config", str(DEFAULT), *shrink_args(tmp_path / "out", tiny_data_root),
                "--model.init_args.optimization.ema_decay", "null"], run=False)
    assert cli.model.settings.optimization.ema_decay is None and cli.model.ema is None
    assert cli.model.settings.optimization.lr == 1e-3  # the rest of the group stays as the config has it
