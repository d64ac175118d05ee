"""``predict`` under ``bf16-true`` precision (weights and activations in bfloat16) for every backbone, through
the real CLI and each backbone's shipped config: the sampler keeps its state in float32, the denoiser casts it."""

from __future__ import annotations

import pytest

from tests.conftest import CONFIGS, DEFAULT, shrink_args
from tests.helpers.tiny_pipelines import pipeline_overrides, save_tiny_pipeline
from tpdiff_lightning.cli.main import main

pytestmark = pytest.mark.slow

BACKBONE_CONFIGS = {"dit": DEFAULT, "wan": CONFIGS / "wan_lora_flow.yaml", "flux": CONFIGS / "flux_flow.yaml",
                    "animatediff": CONFIGS / "animatediff_ddim.yaml"}


@pytest.mark.parametrize("kind", sorted(BACKBONE_CONFIGS))
def test_predict_under_bf16_true_samples_finite_clips(kind, tmp_path, tiny_data_root, tiny_data_root_17, one_thread):
    import torch

    args = ["predict", "--config", str(BACKBONE_CONFIGS[kind]), "--untrained=true", "--trainer.precision=bf16-true",
            *shrink_args(tmp_path, tiny_data_root_17 if kind == "wan" else tiny_data_root)]
    if kind != "dit":
        args += pipeline_overrides(kind, save_tiny_pipeline(kind, tmp_path / "weights"))
    cli = main(args + ["--return_predictions=true"])
    assert str(cli.trainer.precision) == "bf16-true"
    assert next(cli.model.backbone.parameters()).dtype == torch.bfloat16  # really bf16 weights
    (prediction,) = cli.trainer.predict_loop.predictions
    assert prediction["video"].dtype == torch.uint8 and prediction["video"].shape[0] == 1
    assert len(list(tmp_path.rglob("*.mp4"))) == 1
