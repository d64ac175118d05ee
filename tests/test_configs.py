"""Every YAML in configs/ is parsed against the real CLI, shrunk to CPU size and run once."""

from __future__ import annotations

import pytest
import torch
import yaml

from tests.conftest import DEFAULT, OVERLAYS, shrink_args
from tpdiff_lightning.cli import main


def _config_args(overlay):
    return ["--config", str(DEFAULT)] + (["--config", str(overlay)] if overlay is not None else [])


def test_every_config_file_is_valid_yaml_with_a_usage_comment():
    for path in [DEFAULT, *OVERLAYS]:
        text = path.read_text()
        assert isinstance(yaml.safe_load(text), dict), path
        assert text.startswith("#"), f"{path} should start with a comment saying what it is"


@pytest.mark.parametrize("overlay", [None, *OVERLAYS], ids=lambda p: "default" if p is None else p.stem)
def test_config_parses_and_builds(overlay):
    cli = main(_config_args(overlay), run=False)
    module, data = cli.model, cli.datamodule
    assert module.pyramid.num_frames == data.num_frames  # linked from the data
    expected = yaml.safe_load((overlay or DEFAULT).read_text())["model"]["init_args"]
    for key in ("num_stages", "schedule", "alignment"):
        if key in expected:
            assert module.hparams[key] == expected[key]
    if "reductions" in expected:
        assert tuple(module.pyramid.reductions) == tuple(expected["reductions"])
    if "partition" in expected:
        assert tuple(module.pyramid.partition) == tuple(expected["partition"])


@pytest.mark.slow
@pytest.mark.parametrize("overlay", [None, *OVERLAYS], ids=lambda p: "default" if p is None else p.stem)
def test_config_runs_once_at_tiny_size(overlay, tmp_path, tiny_data_root):
    cli = main(["fit", *_config_args(overlay), *shrink_args(tmp_path, tiny_data_root)])
    assert cli.trainer.global_step == 2
    logged = cli.trainer.logged_metrics
    assert torch.isfinite(logged["train/loss"])
    assert any(k.startswith("val/loss_stage") for k in logged)
    ckpts = list(tmp_path.rglob("last.ckpt"))
    assert len(ckpts) == 1
