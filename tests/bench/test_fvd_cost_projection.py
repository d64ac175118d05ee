"""The FLOP projection of the FVD-eval overhead in bench/fvd_cost.py: its arithmetic on a tiny meta-device DiT,
and the `--project` path on a real full-size config (meta device, no weights)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from tpdiff_lightning.method.pyramid import TemporalPyramid
from tpdiff_lightning.method.sampling import split_steps
from tpdiff_lightning.models.dit import VideoDiT

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "bench") not in sys.path:  # fvd_cost imports the bench helpers as `common`, also when run alone
    sys.path.insert(0, str(ROOT / "bench"))


def _load_bench():
    spec = importlib.util.spec_from_file_location("fvd_cost_projection_under_test", ROOT / "bench" / "fvd_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fvd_cost = _load_bench()

C, D, L, H, W, F = 4, 32, 8, 16, 16, 16


@pytest.fixture(scope="module")
def dit_flops():
    """``(frames, stride) -> FLOPs`` of a tiny VideoDiT built on the meta device."""
    with torch.device("meta"):
        dit = VideoDiT(C, D, size="dit-tiny")
    return fvd_cost.stage_forward_flops(dit, C, D, L, H, W), dit


def _project(dit_flops, pyramid, **overrides):
    forward, _ = dit_flops
    kwargs = dict(global_batch=8, num_videos=4, every_n_steps=100, num_steps=12, guidance_scale=2.0,
                  encode_flops=3e6, decode_flops=5e6, text_flops=1e5, i3d_flops=2e6)
    kwargs.update(overrides)
    return fvd_cost.project_overhead(pyramid, forward, **kwargs)


def test_overhead_halves_when_interval_doubles(dit_flops):
    pyramid = TemporalPyramid("flow", F, 3)
    a = _project(dit_flops, pyramid, every_n_steps=100)
    b = _project(dit_flops, pyramid, every_n_steps=200)
    assert a["eval_flops_per_point"] == b["eval_flops_per_point"] > 0
    assert a["train_flops_per_step"] == b["train_flops_per_step"] > 0
    assert math.isclose(b["overhead"], a["overhead"] / 2, rel_tol=1e-12)
    assert math.isclose(b["overhead_latent_cache"], a["overhead_latent_cache"] / 2, rel_tol=1e-12)
    # the latent cache makes training cheaper, so the same evaluation weighs more
    assert a["overhead_latent_cache"] > a["overhead"]


def test_overhead_is_eval_over_interval_times_training(dit_flops):
    p = _project(dit_flops, TemporalPyramid("ddim", F, 2, partition=[1, 3]))
    parts = p["eval_denoiser_flops"] + p["eval_text_flops"] + p["eval_vae_decode_flops"] + p["eval_i3d_flops"]
    assert math.isclose(p["eval_flops_per_point"], parts, rel_tol=1e-12)
    assert math.isclose(p["overhead"], p["eval_flops_per_point"] / (100 * p["train_flops_per_step"]), rel_tol=1e-12)
    steps = split_steps(12, [1, 3])
    assert [s["sample_steps"] for s in p["stages"]] == steps
    expected = 4 * 2 * sum(n * s["forward_flops"] for n, s in zip(steps, p["stages"]))
    assert math.isclose(p["eval_denoiser_flops"], expected, rel_tol=1e-12)
    # training: weights follow the partition by default, 3 x forward per clip
    train = 8 * 3 * (0.25 * p["stages"][0]["forward_flops"] + 0.75 * p["stages"][1]["forward_flops"])
    assert math.isclose(p["train_denoiser_flops_per_step"], train, rel_tol=1e-12)


def test_interval_for_target_reaches_it(dit_flops):
    pyramid = TemporalPyramid("flow", F, 3)
    p = _project(dit_flops, pyramid, every_n_steps=1)
    for key in ("", "_latent_cache"):
        n = p["every_n_steps_for_target" + key]
        at_n = _project(dit_flops, pyramid, every_n_steps=n)["overhead" + key]
        assert at_n <= fvd_cost.TARGET
        if n > 1:
            assert _project(dit_flops, pyramid, every_n_steps=n - 1)["overhead" + key] > fvd_cost.TARGET


def test_tpdiff_is_cheaper_than_vanilla(dit_flops):
    tpdiff = _project(dit_flops, TemporalPyramid("flow", F, 3))
    vanilla = _project(dit_flops, TemporalPyramid("flow", F, 1))
    assert tpdiff["eval_denoiser_flops"] < vanilla["eval_denoiser_flops"]
    assert tpdiff["eval_flops_per_point"] < vanilla["eval_flops_per_point"]
    assert tpdiff["train_denoiser_flops_per_step"] < vanilla["train_denoiser_flops_per_step"]
    # the parts that do not depend on the pyramid are the same
    assert tpdiff["eval_vae_decode_flops"] == vanilla["eval_vae_decode_flops"]
    assert tpdiff["eval_i3d_flops"] == vanilla["eval_i3d_flops"]


def test_single_stage_runs_at_full_rate(dit_flops):
    forward, dit = dit_flops
    with torch.device("meta"):
        x, t = torch.empty(1, C, F, H, W), torch.full((1,), 500.0)
        text, mask = torch.empty(1, L, D), torch.ones(1, L, dtype=torch.bool)
    full = fvd_cost.count_flops(lambda: dit(x, t, text, mask, stride=1))
    vanilla = _project(dit_flops, TemporalPyramid("flow", F, 1))
    assert [s["latent_frames"] for s in vanilla["stages"]] == [F]
    assert vanilla["stages"][0]["forward_flops"] == full == vanilla["full_rate_forward_flops"]
    tpdiff = _project(dit_flops, TemporalPyramid("flow", F, 3))
    assert [s["latent_frames"] for s in tpdiff["stages"]] == [F // 4, F // 2, F]
    assert tpdiff["stages"][-1]["forward_flops"] == full
    assert tpdiff["stages"][0]["forward_flops"] < tpdiff["stages"][1]["forward_flops"] < full


def test_guidance_doubles_the_denoiser(dit_flops):
    pyramid = TemporalPyramid("flow", F, 3)
    guided = _project(dit_flops, pyramid, guidance_scale=5.0)
    plain = _project(dit_flops, pyramid, guidance_scale=1.0)
    assert math.isclose(guided["eval_denoiser_flops"], 2 * plain["eval_denoiser_flops"], rel_tol=1e-12)
    assert guided["eval_vae_decode_flops"] == plain["eval_vae_decode_flops"]


def test_bad_interval_is_a_clear_error(dit_flops):
    with pytest.raises(ValueError, match="every_n_steps=0"):
        _project(dit_flops, TemporalPyramid("flow", F, 3), every_n_steps=0)


def test_a_spatiotemporal_pyramid_counts_each_stage_at_its_own_size(dit_flops):
    from torch.utils.flop_counter import FlopCounterMode

    forward, dit = dit_flops
    spatial = _project(dit_flops, TemporalPyramid("flow", F, 3, spatial_reductions=(1, 2)))
    temporal = _project(dit_flops, TemporalPyramid("flow", F, 3))
    assert [s["spatial_stride"] for s in spatial["stages"]] == [2, 2, 1]
    with torch.device("meta"), torch.no_grad(), FlopCounterMode(display=False) as counter:  # stage 0 counted by hand
        dit(torch.empty(1, C, 4, H // 2, W // 2), torch.full((1,), 500.0), torch.empty(1, L, D),
            torch.ones(1, L, dtype=torch.bool), stride=4, spatial_stride=2)
    assert spatial["stages"][0]["forward_flops"] == counter.get_total_flops() < temporal["stages"][0]["forward_flops"]
    assert spatial["stages"][2]["forward_flops"] == temporal["stages"][2]["forward_flops"]
    assert spatial["eval_denoiser_flops"] < temporal["eval_denoiser_flops"]
    assert spatial["train_flops_per_step"] < temporal["train_flops_per_step"]


def test_config_chain_composes_the_vanilla_overlay():
    cfg = fvd_cost.load_config_chain("configs/wan_lora_flow_vanilla.yaml")
    settings = fvd_cost.read_projection_settings(cfg)
    assert settings["num_stages"] == 1 and settings["partition"] == [1]
    assert settings["num_frames"] == 81 and (settings["height"], settings["width"]) == (480, 832)
    assert settings["anchor_first_frame"] and settings["guidance_scale"] == 5.0
    with pytest.raises(FileNotFoundError, match="no_such.yaml"):
        fvd_cost.load_config_chain("configs/no_such.yaml")


def test_project_path_end_to_end(tmp_path, monkeypatch):
    """`--project` on the full-size AnimateDiff config: meta-device models, the JSON labelled as a projection."""
    out = tmp_path / "fvd_cost.json"
    monkeypatch.setattr(sys, "argv", ["fvd_cost.py", "--no-speed", "--project", "configs/animatediff_ddim.yaml",
                                      "--out", str(out)])
    fvd_cost.main()
    result = json.loads(out.read_text())
    assert "i3d" not in result
    projection = result["projection"]
    assert "not a measurement" in projection["method"] and "utilisation" in projection["method"]
    p = projection["configs"]["configs/animatediff_ddim.yaml"]
    assert [s["latent_frames"] for s in p["stages"]] == [4, 8, 16]
    assert [s["stride"] for s in p["stages"]] == [4, 2, 1]
    assert p["global_batch"] == 4 * 8 * 4 and p["num_videos"] == 512 and p["every_n_steps"] == 5000
    assert p["cfg_factor"] == 2 and sum(s["sample_steps"] for s in p["stages"]) == 25
    assert all(s["forward_flops"] > 0 for s in p["stages"])
    assert p["per_clip"]["vae_decode_flops"] > 0 and p["per_clip"]["i3d_flops"] > 0
    assert math.isclose(p["overhead"], p["eval_flops_per_point"] / (5000 * p["train_flops_per_step"]), rel_tol=1e-9)
    # a full-size SD1.5 UNet forward on 16 frames at 64x64 latents is teraFLOPs, far above the tiny models
    assert p["full_rate_forward_flops"] > 1e12
