"""Every YAML in configs/ is parsed against the real CLI, shrunk to CPU size and run once.

A config's usage line (``python lightning_cli.py fit --config A.yaml --config B.yaml``) names the files it is
used with; the test composes exactly those. Backbone configs get tiny random weight folders in their place.
Strategy overlays (configs/strategy/) are tested in test_strategies.py.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from tests.conftest import CONFIGS, DEFAULT, OVERLAYS, config_callbacks, config_chain, shrink_args
from tests.helpers.tiny_pipelines import config_kind, pipeline_overrides, save_tiny_pipeline
from tpdiff_lightning.cli.main import main
from tpdiff_lightning.data.synthetic import read_manifest
from tpdiff_lightning.training.settings import GROUPS

RUNNABLE = [DEFAULT, *(p for p in OVERLAYS if "strategy" not in p.relative_to(CONFIGS).parts)]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """One tiny weights folder per backbone kind, built on first use."""
    built = {}

    def get(kind: str):
        if kind not in built:
            built[kind] = save_tiny_pipeline(kind, tmp_path_factory.mktemp(f"weights-{kind}"))
        return built[kind]
    return get


def _tiny_resolution(chain) -> int:
    """Pixels per side for a backbone config at tiny size: 64 (8x8 latents) when a spatio-temporal pyramid
    shrinks the latents by 4, else 32."""
    for p in chain:
        init = (yaml.safe_load(p.read_text()).get("model") or {}).get("init_args") or {}
        if any(q > 1 for q in (init.get("pyramid") or {}).get("spatial_reductions") or []):
            return 64
    return 32


def _args(path, pipelines) -> list[str]:
    chain = config_chain(path)
    args = [a for p in chain for a in ("--config", str(p))]
    kind = config_kind(chain)
    return args + (pipeline_overrides(kind, pipelines(kind), _tiny_resolution(chain)) if kind else [])


def test_every_config_file_is_valid_yaml_with_a_usage_comment():
    for path in [DEFAULT, *OVERLAYS]:
        text = path.read_text()
        assert isinstance(yaml.safe_load(text), dict), path
        assert text.startswith("#"), f"{path} should start with a comment saying what it is"
        assert "lightning_cli.py" in text, f"{path} should show the command that uses it"


def test_every_runnable_config_names_itself_last_in_its_usage_line():
    for path in RUNNABLE:
        chain = config_chain(path)
        assert chain[-1] == path and all(p.exists() for p in chain), (path, chain)


def _model_args(name: str) -> dict:
    """A config's model settings, each group's fields side by side (``{"num_stages": 3, "lr": 5e-5, ...}``)."""
    init_args = yaml.safe_load((CONFIGS / name).read_text())["model"]["init_args"]
    return {key: value for group in GROUPS for key, value in (init_args.get(group) or {}).items()}


def test_pretrained_backbone_configs_use_each_models_own_velocity_schedule_and_global_alignment():
    wan, flux, animatediff = (_model_args(n) for n in ("wan_lora_flow.yaml", "flux_flow.yaml", "animatediff_ddim.yaml"))
    assert wan["flow_velocity"] == flux["flow_velocity"] == "global"  # what a pretrained flow model predicts
    assert wan["timestep_shift"] == 5.0  # Wan2.1's T2V sampling shift
    assert animatediff["beta_schedule"] == "linear" and "flow_velocity" not in animatediff
    for args in (wan, flux, animatediff):  # alignment acts on the global batch, never on 1 clip per device
        assert args["alignment"] and args["alignment_scope"] == "global" and args.get("stage_sync", True)
    # The from-scratch default keeps the paper's stage-time objective.
    assert _model_args("default.yaml").get("flow_velocity", "stage") == "stage"


@pytest.mark.parametrize("path", RUNNABLE, ids=lambda p: p.stem)
def test_config_parses_and_builds(path, pipelines):
    cli = main(_args(path, pipelines), run=False)
    module, data = cli.model, cli.datamodule
    assert module.pyramid.num_frames == module.latent_frames(data.num_frames)  # linked from the data
    written = {}  # every settings group field the chain of YAML files sets, later files winning
    for p in config_chain(path):
        for group, fields in ((yaml.safe_load(p.read_text()).get("model") or {}).get("init_args") or {}).items():
            if group in GROUPS:
                written.setdefault(group, {}).update(fields)
    for group, fields in written.items():
        for key, value in fields.items():
            got = getattr(getattr(module.settings, group), key)
            assert (list(got) if isinstance(got, tuple) else got) == value, (group, key)
    expected = {k: v for fields in written.values() for k, v in fields.items()}
    assert module.pyramid.flow_velocity == expected.get("flow_velocity", "stage")
    if module.pyramid.schedule.name == "ddim":
        assert module.pyramid.schedule.beta_schedule == (expected.get("beta_schedule") or "scaled_linear")
    if "reductions" in expected:
        assert tuple(module.pyramid.reductions) == tuple(expected["reductions"])
    if "partition" in expected:
        assert tuple(module.pyramid.partition) == tuple(expected["partition"])
    assert tuple(module.pyramid.spatial_reductions) == tuple(expected.get("spatial_reductions") or
                                                             (1,) * (module.pyramid.num_stages - 1))


@pytest.mark.slow
@pytest.mark.parametrize("path", RUNNABLE, ids=lambda p: p.stem)
def test_config_runs_once_at_tiny_size(path, tmp_path, tiny_data_root, tiny_data_root_17, tiny_data_root_anywhere,
                                       pipelines):
    """Each config as written (its precision, clipping, accumulation, optimizer, EMA and callbacks), shrunk
    only in size: frames, resolution, widths, steps, clip counts and callback intervals, on one CPU device. A config
    with centred synthetic paths reads tiny shards built that way (the same build arguments, so none is rebuilt)."""
    chain = config_chain(path)
    kind = config_kind(chain)
    data = {}
    for p in chain:
        data.update(((yaml.safe_load(p.read_text()) or {}).get("data") or {}).get("init_args") or {})
    root = (tiny_data_root_17 if kind == "wan" else
            tiny_data_root if data.get("synthetic_paths") == "centred" else tiny_data_root_anywhere)
    written = {}
    for p in chain:
        written.update((yaml.safe_load(p.read_text()) or {}).get("trainer") or {})
    cli = main(["fit", *[a for p in chain for a in ("--config", str(p))],
                *shrink_args(tmp_path, root, callbacks=config_callbacks(chain, tmp_path, root)),
                *(pipeline_overrides(kind, pipelines(kind), _tiny_resolution(chain)) if kind else [])])
    trainer = cli.trainer
    assert trainer.global_step == 2
    for key in ("precision", "gradient_clip_val", "accumulate_grad_batches"):  # nothing under test was changed
        if key in written:
            assert getattr(trainer, key) == written[key], key
    expected_callbacks = [cb["class_path"].rsplit(".", 1)[-1] for cb in config_callbacks(chain, tmp_path, root)]
    present = {type(cb).__name__ for cb in trainer.callbacks}
    assert set(expected_callbacks) <= present, (expected_callbacks, present)
    fvd = [cb for cb in trainer.callbacks if type(cb).__name__ == "FVDCurve"]
    assert all(cb._last_eval_step == 2 for cb in fvd)  # the FVD curve really evaluated, with the real I3D
    logged = cli.trainer.logged_metrics
    assert torch.isfinite(logged["train/loss"])
    assert any(k.startswith("val/loss_stage") for k in logged)
    ckpts = list(tmp_path.rglob("last.ckpt"))
    assert len(ckpts) == 1
    assert read_manifest(root)["args"].get("paths", "anywhere") == data.get("synthetic_paths", "anywhere")


@pytest.mark.parametrize("name, folder", [("animatediff_ddim.yaml", "weights/animatediff-sd15"),
                                          ("wan_lora_flow.yaml", "weights/Wan2.1-T2V-1.3B-Diffusers"),
                                          ("flux_flow.yaml", "weights/miniflux")])
def test_backbone_configs_name_their_weights_folder_when_it_is_missing(name, folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no weights/ here
    # jsonargparse reports the class's FileNotFoundError inside its own ValueError; the message is the point.
    with pytest.raises((FileNotFoundError, ValueError), match=f"weights folder '{folder}' does not exist"):
        main(["--config", str(CONFIGS / name)], run=False)


def test_the_pyramidal_wan_config_gives_pyramidal_wans_three_stage_shapes():
    from tpdiff_lightning.method.pyramid import TemporalPyramid

    wan, overlay = _model_args("wan_lora_flow.yaml"), _model_args("wan_lora_flow_spatiotemporal.yaml")
    data = yaml.safe_load((CONFIGS / "wan_lora_flow_spatiotemporal.yaml").read_text())["data"]["init_args"]
    H, W = data["resolution"]
    args = {**wan, **overlay}
    p = TemporalPyramid("flow", (81 - 1) // 4 + 1, args["num_stages"], args["reductions"],
                        anchor_first_frame=args["anchor_first_frame"], spatial_reductions=args["spatial_reductions"])
    shapes = [(s.num_frames, *p.stage_size(H // 8, W // 8, s.index)) for s in p.stages]  # Wan's VAE: 8x in space
    assert shapes == [(6, 14, 26), (11, 28, 52), (21, 56, 104)]  # 21 x 112x208, 41 x 224x416, 81 x 448x832 video
    assert all(h % 2 == 0 and w % 2 == 0 for _, h, w in shapes)  # whole 2x2 Wan patches at every stage
