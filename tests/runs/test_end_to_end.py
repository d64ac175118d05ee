"""End to end through the real CLI: fit, kill, resume; validate; predict to mp4."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from tests.conftest import DEFAULT, ROOT, shrink_args
from tpdiff_lightning.cli.main import main
from tpdiff_lightning.data.video_io import decode_mp4

pytestmark = pytest.mark.slow

FREQUENT_CHECKPOINTS = [
    {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
     "init_args": {"save_last": True, "every_n_train_steps": 2, "save_top_k": -1}},
]


def _ckpt_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def _run_dir(out: Path) -> Path:
    return out / "synthetic" / "tpdiff-flow"


def test_fit_killed_then_resumed_continues_where_it_was(tmp_path, tiny_data_root):
    out = tmp_path / "out"
    base = [sys.executable, str(ROOT / "lightning_cli.py"), "fit", "--config", str(DEFAULT)]
    args = shrink_args(out, tiny_data_root, max_steps=10_000, steps_per_epoch=50, callbacks=FREQUENT_CHECKPOINTS)
    proc = subprocess.Popen(base + args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    last = _run_dir(out) / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    killed_at = None
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
            if last.is_file():
                try:
                    step = _ckpt_step(last)
                except Exception:  # caught mid-write
                    continue
                if step >= 6:
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed_at = step
                    break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert killed_at is not None, proc.stderr.read().decode()[-3000:]
    resumed_from = _ckpt_step(last)
    target = resumed_from + 4
    cli = main(["fit", "--config", str(DEFAULT), *shrink_args(out, tiny_data_root, max_steps=target, steps_per_epoch=50,
                                                             callbacks=FREQUENT_CHECKPOINTS), "--ckpt_path", "last"])
    assert cli.trainer.global_step == target
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == target
    # EMA, optimizer and LR schedule all continued rather than restarting at the resume point.
    assert int(ckpt["state_dict"]["ema.num_updates"]) == target
    assert ckpt["lr_schedulers"][0]["last_epoch"] == target
    assert int(next(iter(ckpt["optimizer_states"][0]["state"].values()))["step"]) == target


def test_validate_and_predict_from_a_checkpoint(tmp_path, tiny_data_root):
    out = tmp_path / "out"
    main(["fit", "--config", str(DEFAULT), *shrink_args(out, tiny_data_root, max_steps=2)])
    ckpt = _run_dir(out) / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    trained_config = (_run_dir(out) / "config.yaml").read_text()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = main(["validate", "--config", str(DEFAULT), *shrink_args(out, tiny_data_root), "--ckpt_path", str(ckpt)])
    assert not [w for w in caught if "model settings replace" in str(w.message)]  # nothing was asked to change
    metrics = cli.trainer.callback_metrics
    assert {"val/loss", "val/loss_stage0", "val/loss_stage1", "val/loss_stage2"} <= set(metrics)
    # A structural setting that differs from the checkpoint's is replaced by it, and the user is told so.
    with pytest.warns(UserWarning, match=r"model settings replace .*num_stages: 1 -> 3") as caught:
        cli = main(["validate", "--config", str(DEFAULT), *shrink_args(out, tiny_data_root), "--ckpt_path", str(ckpt),
                    "--model.init_args.pyramid.num_stages=1", "--data.init_args.num_frames=8"])
    assert cli.model.settings.pyramid.num_stages == 3
    # The clip shape follows the data, not the checkpoint: that is said too.
    assert cli.model.settings.clip.num_frames == 8
    assert any("num_frames: trained with 16, the data gives 8" in str(w.message) for w in caught)
    prompts = "[a red square moving right fast, a blue circle moving up slow]"
    cli = main(["predict", "--config", str(DEFAULT), *shrink_args(out, tiny_data_root),
                f"--data.init_args.predict_prompts={prompts}", "--return_predictions=false",
                "--model.init_args.sampling.steps=4", "--model.init_args.sampling.guidance_scale=2.5", "--ckpt_path", str(ckpt)])
    # Sampling settings on the command line win over the checkpoint's (which has sample_steps=5, guidance 1).
    assert cli.model.settings.sampling.steps == 4 and cli.model.settings.sampling.guidance_scale == 2.5
    pred_dir = _run_dir(out) / "predictions"
    mp4s = sorted(pred_dir.glob("*.mp4"))
    assert len(mp4s) == 2 and "rank0" in mp4s[0].name
    frames = decode_mp4(mp4s[0].read_bytes())
    assert frames.shape == (16, 16, 16, 3) and frames.dtype.name == "uint8"
    assert (pred_dir / "contact_sheet_rank0.png").is_file()
    # validate and predict record their own configs beside the training run's, which stays as trained.
    assert (_run_dir(out) / "config.yaml").read_text() == trained_config
    assert "ckpt_path" in (_run_dir(out) / "config_predict.yaml").read_text()
    assert (_run_dir(out) / "config_validate.yaml").is_file()
