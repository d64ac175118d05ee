"""The FVD curve callback end to end, with a small fixed feature network in place of I3D."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import DEFAULT, shrink_args
from tests.helpers.gloo import free_port
from tpdiff_lightning.callbacks.fvd_curve import FVDCurve
from tpdiff_lightning.cli.main import main
from tpdiff_lightning.training.settings import ClipSettings

pytestmark = pytest.mark.slow


class ColourFeatures:
    """400 fixed random projections of per-frame mean colours: cheap, deterministic, sensitive to content."""

    def __init__(self):
        self.proj = torch.randn(16 * 3, 400, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def __call__(self, videos):
        x = videos.to(torch.float64).mean(dim=(2, 3))  # (B, T, 3)
        return x.flatten(1)[:, : self.proj.shape[0]] @ self.proj


def _fit(tmp_path, data_root, steps, ckpt_path=None, callback=None, purge_step=None):
    # Stages drawn alike: under the default's [8, 1, 1] the first steps are all noisiest-stage steps, which at this
    # size add up to under half a GFLOP, and the @GFLOP axis (whole GFLOPs) would read 0.
    cli = main(["--config", str(DEFAULT), *shrink_args(tmp_path / "out", data_root, max_steps=steps,
                                                       steps_per_epoch=50),
                "--model.init_args.pyramid.stage_weights=null"], run=False)
    callback = callback or FVDCurve(eval_root=str(data_root), num_videos=4, every_n_steps=2,
                                    cache_dir=str(tmp_path / "cache"), feature_extractor=ColourFeatures(),
                                    extractor_name="colour-test", num_steps=3)
    cli.trainer.callbacks.append(callback)
    if purge_step is not None:  # what the CLI does on a resume
        from tpdiff_lightning.runs.tensorboard import purge_tensorboard_after

        purge_tensorboard_after(cli.trainer, purge_step)
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=ckpt_path)
    return cli, callback


def _scalars(run_dir, tag):
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    ea.Reload()
    return [(e.step, e.value) for e in ea.Scalars(tag)] if tag in ea.Tags()["scalars"] else []


def curve_with_captions(data_root, cache):
    return FVDCurve(eval_root=str(data_root), num_videos=4, every_n_steps=2, cache_dir=str(cache),
                    feature_extractor=ColourFeatures(), extractor_name="colour-test", num_steps=3,
                    caption_accuracy=True)


def test_fvd_curve_logs_against_steps_gpu_hours_and_flops_and_resumes(tmp_path, tiny_data_root):
    """FVD and the caption accuracy (colour, direction, their chance levels) against steps, GPU-hours and training
    FLOPs; a resume continues all three axes."""
    cli, cb = _fit(tmp_path, tiny_data_root, 4, callback=curve_with_captions(tiny_data_root, tmp_path / "cache"))
    run_dir = tmp_path / "out" / "synthetic" / "tpdiff-flow"
    by_step = _scalars(run_dir, "fvd/synthetic-4")
    assert [s for s, _ in by_step] == [2, 4] and all(v >= 0 for _, v in by_step)
    by_hours = _scalars(run_dir / "gpu_hours", "fvd/synthetic-4@mGPUh")
    assert len(by_hours) == 2 and [v for _, v in by_hours] == [v for _, v in by_step]
    by_flops = _scalars(run_dir / "flops", "fvd/synthetic-4@GFLOP")
    assert [v for _, v in by_flops] == [v for _, v in by_step] and 0 < by_flops[0][0] < by_flops[1][0]
    assert by_flops[1][0] == round(cb.flops.total / 1e9) and len(cb.flops.per_step) <= 3  # one count per stage
    for tag in ("caption/colour_accuracy", "caption/direction_accuracy"):
        points = _scalars(run_dir, tag)
        assert [s for s, _ in points] == [2, 4] and all(0 <= v <= 1 for _, v in points)
        assert len(_scalars(run_dir / "gpu_hours", f"{tag}@mGPUh")) == 2
        assert len(_scalars(run_dir / "flops", f"{tag}@GFLOP")) == 2
    assert {v for _, v in _scalars(run_dir, "caption/direction_chance")} == {0.25}
    assert {v for _, v in _scalars(run_dir, "caption/colour_chance")} == {0.25}
    flops = cb.flops.total
    hours = [v for _, v in _scalars(run_dir, "compute/gpu_hours")]
    assert len(hours) == 2 and 0 < hours[0] < hours[1]
    assert len(list((tmp_path / "cache").glob("synthetic-*.pt"))) == 1  # real statistics cached once
    trained = cb.train_seconds
    assert trained > 0 and cb.eval_seconds > 0

    # Resume: the GPU-hours come back from the checkpoint and keep growing.
    resumed = curve_with_captions(tiny_data_root, tmp_path / "cache")
    _fit(tmp_path, tiny_data_root, 6, ckpt_path="last", callback=resumed)
    assert resumed.train_seconds > trained and resumed.flops.total > flops
    hours = [v for _, v in _scalars(run_dir, "compute/gpu_hours")]
    assert hours == sorted(hours) and len(hours) == 3
    # The curve continues: one point per evaluation, none repeated or missing, on both x-axes.
    assert [s for s, _ in _scalars(run_dir, "fvd/synthetic-4")] == [2, 4, 6]
    mgpuh = [s for s, _ in _scalars(run_dir / "gpu_hours", "fvd/synthetic-4@mGPUh")]
    assert len(mgpuh) == 3 and mgpuh == sorted(mgpuh)
    gflops = [s for s, _ in _scalars(run_dir / "flops", "fvd/synthetic-4@GFLOP")]
    assert len(gflops) == 3 and gflops == sorted(gflops) and gflops[-1] == round(resumed.flops.total / 1e9)
    assert [s for s, _ in _scalars(run_dir, "caption/direction_accuracy")] == [2, 4, 6]


def test_a_resume_keeps_the_gpu_hours_curve_and_the_checkpoint_steps_point(tmp_path, tiny_data_root):
    """On 8 GPUs the milli-GPU-hours soon exceed the step count; the step axis's purge on resume (events at
    >= the resumed step) must not wipe the GPU-hours curve, nor the evaluation logged at the checkpoint's step
    (its FVD and its caption accuracy)."""
    def curve(seconds=0.0):
        cb = curve_with_captions(tiny_data_root, tmp_path / "cache")
        cb.train_seconds = seconds
        return cb

    _fit(tmp_path, tiny_data_root, 4, callback=curve(3600.0))  # as if an hour had been trained: x >= 1000 mGPUh
    run_dir = tmp_path / "out" / "synthetic" / "tpdiff-flow"
    before = _scalars(run_dir / "gpu_hours", "fvd/synthetic-4@mGPUh")
    assert len(before) == 2 and before[0][0] >= 1000
    _fit(tmp_path, tiny_data_root, 6, ckpt_path="last", callback=curve(), purge_step=4)
    after = _scalars(run_dir / "gpu_hours", "fvd/synthetic-4@mGPUh")
    assert after[:2] == before and len(after) == 3 and after[2][0] >= before[1][0]
    by_step = _scalars(run_dir, "fvd/synthetic-4")
    assert [s for s, _ in by_step] == [2, 4, 6] and by_step[1][1] == pytest.approx(before[1][1])
    for tag in ("caption/colour_accuracy", "caption/direction_accuracy", "caption/direction_chance"):
        assert [s for s, _ in _scalars(run_dir, tag)] == [2, 4, 6], tag


def test_fvd_curve_rejects_too_few_videos():
    with pytest.raises(ValueError, match="num_videos=1"):
        FVDCurve(num_videos=1)


def test_default_config_fvd_curve_runs_with_the_real_i3d(tmp_path, tiny_data_root):
    import yaml

    fvd = next(cb for cb in yaml.safe_load(DEFAULT.read_text())["trainer"]["callbacks"]
               if cb["class_path"].endswith("FVDCurve"))
    fvd["init_args"].update(eval_root=str(tiny_data_root), num_videos=3, every_n_steps=2,
                            cache_dir=str(tmp_path / "cache"), num_steps=3)
    cli = main(["fit", "--config", str(DEFAULT),
                *shrink_args(tmp_path / "out", tiny_data_root, max_steps=2, callbacks=[fvd])])
    assert cli.trainer.global_step == 2
    values = _scalars(tmp_path / "out" / "synthetic" / "tpdiff-flow", "fvd/synthetic-3")
    assert len(values) == 1 and values[0][1] >= 0 and values[0][1] < 1e7


def test_tensorboard_serves_both_fvd_axes_over_http(tmp_path, tiny_data_root):
    import json
    import subprocess
    import sys
    import time
    import urllib.parse
    import urllib.request

    _fit(tmp_path, tiny_data_root, 4)
    logdir = tmp_path / "out" / "synthetic"
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
                               "--port", str(port), "--load_fast", "false"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        tags, deadline = {}, time.time() + 60
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{base}/data/plugin/scalars/tags", timeout=5) as r:
                    tags = json.load(r)
                if tags.get("tpdiff-flow/gpu_hours", {}).get("fvd/synthetic-4@mGPUh"):
                    break
            except OSError:
                pass
            time.sleep(1)
        assert {"fvd/synthetic-4", "compute/gpu_hours"} <= set(tags["tpdiff-flow"])
        assert "fvd/synthetic-4@mGPUh" in tags["tpdiff-flow/gpu_hours"]
        for run, tag in (("tpdiff-flow", "fvd/synthetic-4"), ("tpdiff-flow/gpu_hours", "fvd/synthetic-4@mGPUh")):
            query = urllib.parse.urlencode({"run": run, "tag": tag})
            with urllib.request.urlopen(f"{base}/data/plugin/scalars/scalars?{query}", timeout=10) as r:
                points = json.load(r)  # [[wall_time, step, value], ...]
            assert len(points) == 2 and all(p[2] >= 0 for p in points)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_missing_eval_set_fails_at_setup_naming_what_there_is(tmp_path, tiny_data_root):
    with pytest.raises(FileNotFoundError, match=r"eval_split='test' is not in .*splits \['eval', 'train'\]"):
        FVDCurve(eval_root=str(tiny_data_root), eval_split="test").setup(None, None, "fit")
    with pytest.raises(FileNotFoundError, match=r"eval_root=.*has no manifest.json"):
        FVDCurve(eval_root=str(tmp_path)).setup(None, None, "fit")
    FVDCurve(eval_root=str(tmp_path)).setup(None, None, "predict")  # only fit evaluates


def test_backbone_configs_name_the_split_build_msrvtt_writes():
    import yaml

    from tpdiff_lightning.data.msrvtt import SPLIT_ROLES

    for name in ("animatediff_ddim", "wan_lora_flow", "flux_flow"):
        callbacks = yaml.safe_load((DEFAULT.parent / f"{name}.yaml").read_text())["trainer"]["callbacks"]
        fvd = [c["init_args"] for c in callbacks if c["class_path"].endswith("FVDCurve")]
        assert fvd and fvd[0]["eval_split"] in SPLIT_ROLES.values(), (name, fvd)


def test_real_clips_follow_the_training_data_frame_step(tiny_data_root):
    def context(num_frames, frame_stride):
        trainer = SimpleNamespace(datamodule=SimpleNamespace(frame_stride=frame_stride, target_fps=None))
        module = SimpleNamespace(settings=SimpleNamespace(clip=ClipSettings(num_frames, 16)))
        return trainer, module

    callback = FVDCurve(eval_root=str(tiny_data_root), num_videos=2)
    _, every_frame = callback.real_clips(*context(16, 1))
    _, every_other = callback.real_clips(*context(8, 2))
    assert every_other.shape == (2, 8, 16, 16, 3)
    assert torch.equal(every_other, every_frame[:, ::2])
    assert callback.cache_key(*context(8, 1)) != callback.cache_key(*context(8, 2))


def test_flops_are_counted_on_one_device_and_ddp_only(tiny_data_root):
    """Sharded strategies (the counter would see sharded weights) and compiled backbones leave the FLOPs axis
    empty; a resumed total is kept either way."""
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    from tpdiff_lightning.distributed.fsdp2 import FSDP2Strategy

    def enabled(strategy, compile=False):
        curve = FVDCurve(eval_root=str(tiny_data_root), num_videos=2)
        module = SimpleNamespace(backbone=SimpleNamespace(compile=compile))
        curve.setup(SimpleNamespace(strategy=strategy), module, "fit")
        curve.load_state_dict({"train_seconds": 1.0, "eval_seconds": 0.0, "train_flops": 5e12})
        assert curve.flops.total == 5e12
        return curve.flops.enabled

    assert enabled(SingleDeviceStrategy("cpu")) and enabled(DDPStrategy())
    assert not enabled(FSDP2Strategy()) and not enabled(SingleDeviceStrategy("cpu"), compile=True)
