"""Context parallelism in a real ``lightning_cli.py fit``: the loss curve of data-parallel 1 × context-parallel 2
equals one process's step by step (and data-parallel 2 × context-parallel 2 equals data-parallel 2), over steps that
draw every stage, some of them splitting the sequence and some the batch; its sharded checkpoint resumes with the
same degree and without context parallelism."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, DEFAULT, ROOT, shrink_args
from tpdiff_lightning.data.video_io import decode_mp4

STEPS = 10
# The tiny clips (16 frames of 16×16, the default DiT's patch 8) hold 16, 32 and 64 tokens at stages 0, 1, 2. A
# batch of 3 clips does not divide over a group of 2, so with this threshold stages 0 and 1 split the group's batch
# unevenly (2 clips and 1) and the full-rate stage splits every clip's sequence: both modes in one run.
MIN_TOKENS = "--trainer.strategy.init_args.context_parallel_min_tokens=48"
BATCH = 3


def fit(out: Path, data_root: Path, overlay: str | None, devices: int, max_steps: int, extra: list[str] = (),
        command: str = "fit") -> None:
    """``lightning_cli.py fit`` (or ``command``) on the default config with CPU processes (gloo), checkpointing
    every 5 steps."""
    callbacks = [{"class_path": "tpdiff_lightning.callbacks.checkpoint.LinkedLastCheckpoint",
                  "init_args": {"every_n_train_steps": 5, "save_top_k": -1}}]
    if command == "predict":
        callbacks = [{"class_path": "tpdiff_lightning.callbacks.prediction_writer.VideoPredictionWriter",
                      "init_args": {"output_dir": str(out / "predictions")}}]
    strategy = ["--config", str(CONFIGS / "strategy" / f"{overlay}.yaml"),
                "--trainer.strategy.init_args.process_group_backend=gloo"] if overlay else []
    cmd = [sys.executable, str(ROOT / "lightning_cli.py"), command, "--config", str(DEFAULT), *strategy,
           *shrink_args(out, data_root, max_steps=max_steps, steps_per_epoch=2 * STEPS, callbacks=callbacks),
           "--trainer.accelerator=cpu", f"--trainer.devices={devices}", "--trainer.limit_val_batches=0",
           f"--data.init_args.batch_size={BATCH}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]


def curves(out: Path) -> tuple[dict[int, float], dict[int, int]]:
    """``({step: train/loss}, {step: train/stage})`` from the run's TensorBoard events (a resume's purge applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "synthetic" / "tpdiff-flow"), size_guidance={"scalars": 0})
    events.Reload()
    loss = {e.step: e.value for e in events.Scalars("train/loss")}
    stage = {e.step: int(e.value) for e in events.Scalars("train/stage")}
    return loss, stage


def assert_same_curve(got: dict[int, float], expected: dict[int, float], steps: range) -> None:
    assert sorted(got) == list(steps) and set(steps) <= set(expected), (sorted(got), sorted(expected))
    for step in steps:
        assert got[step] == pytest.approx(expected[step], rel=1e-4), (step, got, expected)


def checkpoint(out: Path, step: int) -> Path:
    (path,) = (out / "synthetic" / "tpdiff-flow" / "checkpoints").glob(f"*step={step}.ckpt")
    return path


@pytest.mark.slow
def test_data_parallel_1_context_parallel_2_fits_like_one_process_and_resumes_with_any_degree(tmp_path,
                                                                                              tiny_data_root):
    single, cp = tmp_path / "single", tmp_path / "cp"
    fit(single, tiny_data_root, None, 1, STEPS)
    fit(cp, tiny_data_root, "context_parallel", 2, STEPS, [MIN_TOKENS])
    expected, stages = curves(single)
    loss, cp_stages = curves(cp)
    assert set(stages.values()) == {0, 1, 2} and cp_stages == stages  # every stage, both split modes
    assert_same_curve(loss, expected, range(STEPS))
    mid = checkpoint(cp, 5)
    assert mid.is_dir() and len(list(mid.glob("*.distcp"))) == 2  # one shard per rank of the (1, 2) mesh

    # A resume reseeds the data stream at its step (it does not replay the interrupted run's clips), so the resumed
    # curves are compared with each other: the sharded checkpoint resumes under the same degree and without context
    # parallelism (FSDP2 on one process), and both continue alike, step by step.
    resumed = {}
    for name, overlay, devices, extra in (("same", "context_parallel", 2, [MIN_TOKENS]), ("none", "fsdp2", 1, [])):
        fit(tmp_path / name, tiny_data_root, overlay, devices, STEPS, [*extra, "--ckpt_path", str(mid)])
        resumed[name], _ = curves(tmp_path / name)
    assert_same_curve(resumed["same"], resumed["none"], range(5, STEPS))  # both start at step 5

    # Sampling splits the sequence too (one clip per batch: fewer clips than ranks): predictions from the sharded
    # checkpoint under the group equal one process's.
    frames = {}
    for name, overlay, devices, extra in (("predict_cp", "context_parallel", 2, [MIN_TOKENS]),
                                          ("predict_one", "fsdp2", 1, [])):
        fit(tmp_path / name, tiny_data_root, overlay, devices, STEPS, [
            *extra, "--ckpt_path", str(mid), "--data.init_args.predict_prompts=[a red square moving right fast, "
            "a blue circle moving up slow]", "--data.init_args.batch_size=1", "--model.init_args.sampling.steps=3",
            "--return_predictions=false"], command="predict")
        frames[name] = {p.name.split("_")[0]: decode_mp4(p.read_bytes()).astype(int)
                        for p in sorted((tmp_path / name / "predictions").glob("*.mp4"))}
    assert sorted(frames["predict_cp"]) == sorted(frames["predict_one"]) == ["0000", "0001"]
    for index, video in frames["predict_one"].items():  # float32 sums in another order: a uint8 level at most
        assert abs(frames["predict_cp"][index] - video).max() <= 1, index


@pytest.mark.slow
def test_data_parallel_2_context_parallel_2_fits_like_data_parallel_2(tmp_path, tiny_data_root):
    dp, dp_cp = tmp_path / "dp", tmp_path / "dp_cp"
    fit(dp, tiny_data_root, "fsdp2", 2, STEPS)
    fit(dp_cp, tiny_data_root, "context_parallel", 4, STEPS, [MIN_TOKENS])
    expected, stages = curves(dp)
    loss, cp_stages = curves(dp_cp)
    assert set(stages.values()) == {0, 1, 2} and cp_stages == stages
    assert_same_curve(loss, expected, range(STEPS))


def test_the_threshold_puts_the_tiny_stages_on_both_sides(tiny_data_root):
    """The fits above cover both split modes only while the tiny stages straddle ``MIN_TOKENS`` and their batch
    does not divide over the group."""
    from tpdiff_lightning.cli.main import main
    from tpdiff_lightning.distributed.context_parallel import ContextParallel
    from tpdiff_lightning.models.token_split import token_count

    cli = main(["--config", str(DEFAULT), *shrink_args(tiny_data_root, tiny_data_root), "--trainer.logger=false",
                "--trainer.accelerator=cpu"], run=False)
    module, size = cli.model, cli.model.settings.clip.resolution
    tokens = [token_count(module.backbone, (stage.num_frames, size, size)) for stage in module.pyramid.stages]
    cp = ContextParallel(None, 2, 0, int(MIN_TOKENS.rsplit("=", 1)[1]))
    assert [cp.splits_sequence(n, BATCH) for n in tokens] == [False, False, True], tokens


def test_context_parallel_refuses_a_backbone_without_a_token_split_and_a_degree_that_does_not_divide_the_world():
    from torch import nn

    from tpdiff_lightning.cli.main import main
    from tpdiff_lightning.training.fit_checks import fit_setup_problems

    def problems(devices: int, backbone: nn.Module | None = None) -> list[str]:
        cli = main(["--config", str(DEFAULT), "--config", str(CONFIGS / "strategy" / "context_parallel.yaml"),
                    "--trainer.accelerator=cpu", f"--trainer.devices={devices}", "--trainer.logger=false",
                    "--trainer.strategy.init_args.process_group_backend=gloo"], run=False)
        if backbone is not None:
            cli.model.backbone = backbone
        return fit_setup_problems(cli.trainer, cli.model)

    assert problems(2) == []
    (line,) = problems(3)
    assert "context_parallel_size=2 does not divide the 3 processes" in line
    (line,) = problems(2, nn.Conv3d(4, 4, 1))  # a UNet-like backbone, as AnimateDiff's
    assert "context_parallel_size=2 needs a backbone that splits its tokens" in line and "Conv3d" in line
