"""The benchmark scripts run (smoke form); their numbers are never asserted on."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tpdiff_lightning.data.synthetic import clip_rng, make_clip
from tpdiff_lightning.data.video_io import write_mp4

pytestmark = pytest.mark.slow


def test_pyramid_speed_quick_writes_json(tmp_path):
    out = tmp_path / "speed.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "pyramid_speed.py"), "--quick", "--batch", "1",
                    "--resolution", "16", "--out", str(out)], check=True, cwd=ROOT, capture_output=True)
    result = json.loads(out.read_text())
    assert {"sampling_speedup", "flop_predicted_speedup", "train_speedup_expected"} <= set(result)
    assert result["flop_predicted_speedup"] > 1.0  # fewer frames early must mean fewer FLOPs


def test_caption_accuracy_is_perfect_on_real_synthetic_clips(tmp_path):
    for i in range(8):
        frames, caption, _ = make_clip(clip_rng(0, "eval", i), 16, 32)
        write_mp4(tmp_path / f"{i:04d}_{caption.replace(' ', '_')}_seed{i}_rank0.mp4", frames)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "synthetic_caption_accuracy.py"), str(tmp_path)],
                          check=True, cwd=ROOT, capture_output=True, text=True)
    summary = json.loads((tmp_path / "caption_accuracy.json").read_text())["summary"]
    assert summary["clips"] == 8 and summary["colour_accuracy"] == 1.0 and summary["direction_accuracy"] == 1.0, proc.stdout


def test_fvd_cost_quick_runs(tmp_path):
    out = tmp_path / "fvd.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "fvd_cost.py"), "--quick", "--size", "32", "--out", str(out)],
                   check=True, cwd=ROOT, capture_output=True)
    assert json.loads(out.read_text())["i3d"]["clips_per_s"] > 0
