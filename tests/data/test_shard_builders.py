"""Tests of the OpenVid-1M and MSR-VTT shard builders on tiny fake datasets made of real mp4 files."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from tpdiff_lightning.data import msrvtt, openvid
from tpdiff_lightning.data.datamodule import VideoDataModule
from tpdiff_lightning.data.decoding import stride_for_fps
from tpdiff_lightning.data.shard_writing import Reencode, output_size, reencode_mp4
from tpdiff_lightning.data.synthetic import render_clip
from tpdiff_lightning.data.video_io import decode_mp4, encode_mp4, write_mp4

REPO = Path(__file__).resolve().parents[2]
COLOURS = ("red", "green", "blue", "yellow")
# Special OpenVID rows: (motion tier, aesthetic tier, passes v1, file). Tier T3 is the top 3 of 100 rows,
# T20 the next 17 (top 20 in all) and L the bottom 80, so the v1 answer is known without computing quantiles.
SPECIAL = [
    ("T3", "L", True, "ok"),
    ("L", "T3", True, "ok"),
    ("T20", "T20", True, "ok"),
    ("T20", "T20", True, "ok"),
    ("T3", "T20", True, "ok"),
    ("T20", "L", False, "ok"),
    ("L", "T20", False, "ok"),
    ("L", "L", False, "ok"),
    ("T20", "T20", True, "corrupt"),
    ("T20", "T20", True, "missing"),
    ("T20", "T20", True, "short"),
    ("T3", "T3", True, "empty"),
    ("T20", "T20", True, "ok"),
    ("L", "T3", True, "ok"),
]
TIER_VALUES = {"T3": range(97, 100), "T20": range(80, 97), "L": range(0, 80)}
NUM_ROWS = 100
MIN_FRAMES = 8
OPENVID_KW = dict(min_frames=MIN_FRAMES, clips_per_shard=2, progress=False)


def _clip(index: int, num_frames: int) -> np.ndarray:
    """A smooth moving-shape clip (F, 32, 32, 3) that differs per index."""
    return render_clip(COLOURS[index % 4], "square", "right", "slow", (8.0 + index, 16.0), num_frames, 32)


def _tier_rows() -> list[tuple[str, str]]:
    """(motion tier, aesthetic tier) of all rows: the specials, then fillers that fill every tier and never pass v1."""
    rows = [(m, a) for m, a, _, _ in SPECIAL]
    fill_m20 = 17 - sum(m == "T20" for m, _ in rows)
    fill_a20 = 17 - sum(a == "T20" for _, a in rows)
    rows += [("T20", "L")] * fill_m20 + [("L", "T20")] * fill_a20
    return rows + [("L", "L")] * (NUM_ROWS - len(rows))


def _scores(tiers: list[str], rng: np.random.Generator) -> list[float]:
    """Distinct scores with every row's value inside its tier's range."""
    values = [0.0] * len(tiers)
    for tier, pool in TIER_VALUES.items():
        rows = [i for i, t in enumerate(tiers) if t == tier]
        assert len(rows) == len(pool), f"tier {tier} has {len(rows)} rows, needs {len(pool)}"
        for row, value in zip(rows, rng.permutation(list(pool))):
            values[row] = float(value) / 10 + 0.05
    return values


def _video_name(i: int) -> str:
    # One name with a dot checks that sample keys are sanitised (webdataset splits keys at the first dot).
    return "v12.cut.mp4" if i == 12 else f"v{i:02d}.mp4"


def _write_openvid_file(folder: Path, i: int, kind: str) -> int:
    """Write the video of special row `i` as `kind` and return its frame count."""
    path = folder / _video_name(i)
    frames = 4 if kind == "short" else 8 + i % 9
    if kind in ("ok", "short"):
        write_mp4(path, _clip(i, frames), fps=8)
    elif kind == "corrupt":
        path.write_bytes(b"\x00\x00\x00 ftypisom garbage, not a video" * 20)
    elif kind == "empty":
        path.write_bytes(b"")
    return frames


@pytest.fixture(scope="module")
def fake_openvid(tmp_path_factory) -> dict:
    """A 100-row OpenVid CSV (real column names) with 14 special rows, in shuffled order, and their video files."""
    root = tmp_path_factory.mktemp("openvid")
    videos = root / "videos"
    videos.mkdir()
    rng = np.random.default_rng(0)
    tiers = _tier_rows()
    motion, aesthetic = _scores([m for m, _ in tiers], rng), _scores([a for _, a in tiers], rng)
    rows = []
    for i in range(NUM_ROWS):
        special = i < len(SPECIAL)
        frames = _write_openvid_file(videos, i, SPECIAL[i][3]) if special else 100
        rows.append({
            "video": _video_name(i) if special else f"filler_{i:03d}.mp4",
            "caption": f"caption of row {i}",
            "aesthetic score": aesthetic[i],
            "motion score": motion[i],
            "temporal consistency score": 0.9,
            "camera motion": "static",
            "frame": frames,
            "fps": 8.0,
            "seconds": frames / 8,
        })
    order = rng.permutation(NUM_ROWS)
    csv_path = root / "OpenVid-1M.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[i] for i in order)
    v1 = [int(i) for i in order if i < len(SPECIAL) and SPECIAL[i][2]]
    return {"root": root, "csv": csv_path, "videos": videos, "rows": rows, "v1_in_csv_order": v1}


def _build_openvid(fake: dict, out: Path, **kwargs) -> dict:
    return openvid.build_openvid(fake["csv"], fake["videos"], out, **{**OPENVID_KW, **kwargs})


def _read_samples(out: Path, shards: list[str]) -> list[dict]:
    """All samples of `shards` in order, with txt and json decoded."""
    samples = []
    for sample in wds.WebDataset([str(out / s) for s in shards], shardshuffle=False, empty_check=False):
        samples.append({**sample, "txt": sample["txt"].decode(), "json": json.loads(sample["json"])})
    return samples


def _snapshot(out: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of every shard and sidecar in `out`."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.glob("*.tar*"))}


def test_v1_selection_keeps_exactly_the_constructed_rows(fake_openvid):
    rows = openvid.read_csv(fake_openvid["csv"])
    kept, stats = openvid.select_rows(rows, "v1", 0.2, 0.03, min_frames=0, min_seconds=0.0)
    assert [row["video"] for row in kept] == [_video_name(i) for i in fake_openvid["v1_in_csv_order"]]
    assert stats["csv_rows"] == NUM_ROWS and stats["after_selection"] == 11
    # Between the 80th and 81st of the values 0.05 ... 9.95 (step 0.1).
    assert 7.95 < stats["thresholds"]["motion score"]["top_both"] < 8.05


def test_length_filters_and_selection_all(fake_openvid):
    rows = openvid.read_csv(fake_openvid["csv"])
    kept, stats = openvid.select_rows(rows, "v1", 0.2, 0.03, min_frames=MIN_FRAMES, min_seconds=0.0)
    assert _video_name(10) not in [row["video"] for row in kept] and stats["after_min_frames"] == 10
    everything, stats = openvid.select_rows(rows, "all", 0.2, 0.03, min_frames=0, min_seconds=1.5)
    assert stats["after_selection"] == NUM_ROWS
    assert all(row["seconds"] >= 1.5 for row in everything) and stats["after_min_seconds"] == len(everything) < NUM_ROWS


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(selection="v2"), "selection='v2'"),
        (dict(top_both=0.0), "top_both must be a fraction in \\(0, 1\\], got 0.0"),
    ],
)
def test_bad_selection_arguments_name_the_value(fake_openvid, tmp_path, kwargs, expected):
    with pytest.raises(ValueError, match=expected):
        _build_openvid(fake_openvid, tmp_path, **kwargs)


def test_csv_without_the_published_columns_is_rejected(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("video,caption,motion_score\na.mp4,hello,1.0\n")
    with pytest.raises(ValueError, match="lacks columns .*'aesthetic score'"):
        openvid.read_csv(path)


def test_openvid_build_writes_selected_clips_and_a_full_manifest(fake_openvid, tmp_path):
    manifest = _build_openvid(fake_openvid, tmp_path)
    candidates = [i for i in fake_openvid["v1_in_csv_order"] if i != 10]  # 10 is too short
    written = [i for i in candidates if SPECIAL[i][3] == "ok"]
    split = manifest["splits"]["train"]
    assert split["num_clips"] == len(written) == 7
    samples = _read_samples(tmp_path, split["shards"])
    assert [s["txt"] for s in samples] == [f"caption of row {i}" for i in written]
    assert samples[0]["mp4"] == (fake_openvid["videos"] / _video_name(written[0])).read_bytes()
    assert samples[0]["json"]["csv"]["motion score"] == fake_openvid["rows"][written[0]]["motion score"]
    assert "v12_cut" in [s["__key__"] for s in samples]
    # Shard k holds candidates [2k, 2k + 2); a shard whose two clips were both skipped is left out of the list.
    pairs = [candidates[k : k + 2] for k in range(0, len(candidates), 2)]
    assert split["shards"] == [f"train-{k:06d}.tar" for k, pair in enumerate(pairs) if set(pair) & set(written)]
    assert split["bytes"] == manifest["bytes"] == sum((tmp_path / s).stat().st_size for s in split["shards"])
    assert {(s["file"], s["reason"]) for s in manifest["skipped"]} == {
        (_video_name(8), "undecodable"),
        (_video_name(9), "missing"),
        (_video_name(11), "empty"),
    }
    assert manifest["filter_stats"]["after_min_frames"] == 10
    assert json.loads((tmp_path / "manifest.json").read_text()) == {k: v for k, v in manifest.items() if k != "build"}


def test_openvid_root_without_eval_split_names_the_real_options(fake_openvid, tmp_path):
    _build_openvid(fake_openvid, tmp_path)
    dm = VideoDataModule(root=str(tmp_path), num_frames=8, resolution=16, num_workers=0)
    dm.prepare_data()  # build_synthetic is on, but a real dataset is never overwritten
    assert json.loads((tmp_path / "manifest.json").read_text())["generator"] == openvid.GENERATOR_NAME
    with pytest.raises(FileNotFoundError) as info:
        dm.val_dataloader()
    message = str(info.value)
    assert f"{tmp_path / 'manifest.json'} lists no 'eval' split (it has ['train'])" in message
    assert "--data.init_args.eval_shards" in message and "msrvtt/test-" in message
    assert "--trainer.limit_val_batches=0" in message and "make_synthetic" not in message
    assert len(dm.shard_urls("train")) >= 1


def test_interrupted_build_resumes_to_identical_shards(fake_openvid, tmp_path):
    _build_openvid(fake_openvid, tmp_path)
    before = _snapshot(tmp_path)
    manifest_text = (tmp_path / "manifest.json").read_text()
    # Shard 1 was never finished (a half-written .tmp is left); shard 2 lost its sidecar before being marked done.
    for name in ("train-000001.tar", "train-000001.tar.done", "train-000002.tar.done"):
        (tmp_path / name).unlink()
    (tmp_path / "train-000001.tar.tmp").write_bytes(b"half a tar")
    resumed = _build_openvid(fake_openvid, tmp_path, workers=2)
    after = _snapshot(tmp_path)
    assert resumed["build"]["train"] == {"shards_written": 2, "shards_reused": 3}
    assert {name: data for name, (data, _) in after.items()} == {name: data for name, (data, _) in before.items()}
    assert after["train-000000.tar"][1] == before["train-000000.tar"][1]
    assert (tmp_path / "manifest.json").read_text() == manifest_text

    again = _build_openvid(fake_openvid, tmp_path)
    assert again["build"]["train"] == {"shards_written": 0, "shards_reused": 5}
    assert _snapshot(tmp_path) == after


def test_changed_filters_rewrite_shards_and_remove_stale_ones(fake_openvid, tmp_path):
    _build_openvid(fake_openvid, tmp_path)
    wider = _build_openvid(fake_openvid, tmp_path, min_frames=0)
    assert wider["splits"]["train"]["num_clips"] == 8 and len(list(tmp_path.glob("*.tar"))) == 6
    written = [i for i in fake_openvid["v1_in_csv_order"] if SPECIAL[i][3] in ("ok", "short")]
    captions = [s["txt"] for s in _read_samples(tmp_path, wider["splits"]["train"]["shards"])]
    assert captions == [f"caption of row {i}" for i in written]
    empty = _build_openvid(fake_openvid, tmp_path, min_frames=100)
    assert empty["splits"]["train"] == {"shards": [], "num_clips": 0, "shard_clips": [], "bytes": 0}
    assert not list(tmp_path.glob("*.tar*"))


def test_openvid_cli_reencodes_and_prints_a_summary(fake_openvid, tmp_path, capsys):
    args = ["--csv", str(fake_openvid["csv"]), "--videos", str(fake_openvid["videos"]), "--out", str(tmp_path)]
    manifest = openvid.main([*args, "--min-frames", "8", "--short-side", "16", "--fps", "4", "--no-progress"])
    printed = capsys.readouterr().out
    assert "train: 7 clips" in printed and "skipped 3 clips, 1 empty, 1 missing, 1 undecodable" in printed
    assert manifest["args"]["reencode"] == {"short_side": 16, "fps": 4, "crf": 23}
    sample = _read_samples(tmp_path, manifest["splits"]["train"]["shards"])[0]
    frames = decode_mp4(sample["mp4"])
    source_frames = sample["json"]["csv"]["frame"]
    assert frames.shape == (-(-source_frames // 2), 16, 16, 3)
    stored = {k: sample["json"][k] for k in ("width", "height", "fps", "num_frames")}
    assert stored == {"width": 16, "height": 16, "fps": 4.0, "num_frames": len(frames)}
    assert sample["json"]["csv"]["fps"] == 8.0  # the source rate stays with the CSV row
    # VideoDataModule(target_fps=...) must see the stored rate: 4 fps / 2 fps is a step of 2 (the source 8 fps gives 4).
    assert stride_for_fps({"json": json.dumps(sample["json"]), "mp4": sample["mp4"]}, target_fps=2.0) == 2


def test_reencode_keeps_aspect_even_size_and_resamples_frames():
    grey = np.repeat(np.arange(12, dtype=np.uint8)[:, None, None, None] * 20, 3, axis=3)  # frame k is grey 20k
    data = encode_mp4(np.broadcast_to(grey, (12, 32, 44, 3)).copy(), fps=8)
    down, stored = reencode_mp4(data, Reencode(short_side=10, fps=4))
    frames = decode_mp4(down)
    assert frames.shape == (6, 10, 14, 3) and stored["num_frames"] == 6  # 44 * 10 / 32 = 13.75 -> 14
    np.testing.assert_allclose(frames.mean(axis=(1, 2, 3)), np.arange(6) * 40, atol=4)
    up = decode_mp4(reencode_mp4(data, Reencode(fps=16))[0])
    np.testing.assert_allclose(up.mean(axis=(1, 2, 3)), np.repeat(np.arange(12) * 20, 2), atol=4)
    assert output_size(33, 45, None) == (32, 44)


@pytest.mark.parametrize("kwargs, expected", [(dict(short_side=15), "got 15"), (dict(fps=0), "got 0")])
def test_bad_reencode_options_name_the_value(kwargs, expected):
    with pytest.raises(ValueError, match=expected):
        Reencode(**kwargs)


MSRVTT_SPLITS = {"train": [0, 1, 2, 3], "validate": [4, 5], "test": [6, 7, 8, 9, 10]}


@pytest.fixture(scope="module")
def fake_msrvtt(tmp_path_factory) -> dict:
    """MSR-VTT annotations in both formats; video9 has no captions and video10 has no file."""
    root = tmp_path_factory.mktemp("msrvtt")
    videos = [{"video_id": f"video{i}", "split": split, "id": i} for split, ids in MSRVTT_SPLITS.items() for i in ids]
    sentences = []
    for video in videos:
        i = video["id"]
        if i != 9:
            sentences += [{"video_id": video["video_id"], "caption": f"video{i} says {j}"} for j in range(3 + i % 4)]
        if i != 10:
            write_mp4(root / "videos" / f"video{i}.mp4", _clip(i, 8 + i % 3), fps=8)
    for sen_id, sentence in enumerate(sentences):
        sentence["sen_id"] = sen_id
    test = [v for v in videos if v["split"] == "test"]

    def write(name: str, chosen: list[dict]) -> Path:
        ids = {v["video_id"] for v in chosen}
        data = {"info": {}, "videos": chosen, "sentences": [s for s in sentences if s["video_id"] in ids]}
        (root / name).write_text(json.dumps(data))
        return root / name

    train_val = write("train_val_videodatainfo.json", [v for v in videos if v not in test])
    separate = [train_val, write("test_videodatainfo.json", test)]
    return {"videos": root / "videos", "separate": separate, "single": [write("MSRVTT_data.json", videos)]}


def _build_msrvtt(fake: dict, out: Path, annotations: str = "single", **kwargs) -> dict:
    return msrvtt.build_msrvtt(fake[annotations], fake["videos"], out, clips_per_shard=2, progress=False, **kwargs)


def test_msrvtt_test_split_has_seeded_captions_from_the_clip(fake_msrvtt, tmp_path):
    manifest = _build_msrvtt(fake_msrvtt, tmp_path, seed=3)
    assert list(manifest["splits"]) == ["eval"] and manifest["splits"]["eval"]["num_clips"] == 3
    assert manifest["skipped"] == [{"file": "video10.mp4", "reason": "missing", "detail": ""}]
    assert manifest["filter_stats"]["test"] == {"videos": 5, "without_captions": 1}
    samples = _read_samples(tmp_path, manifest["splits"]["eval"]["shards"])
    assert [s["json"]["video_id"] for s in samples] == ["video6", "video7", "video8"]
    for sample in samples:
        meta = sample["json"]
        i = int(meta["video_id"][5:])
        assert meta["split"] == "test" and meta["captions"] == [f"video{i} says {j}" for j in range(3 + i % 4)]
        assert sample["txt"] == meta["captions"][meta["caption_index"]]
        assert meta["caption_index"] == msrvtt.choose_caption(meta["video_id"], len(meta["captions"]), seed=3)


def test_caption_choice_is_reproducible_and_depends_on_the_seed():
    choices = {seed: [msrvtt.choose_caption(f"video{i}", 20, seed) for i in range(7010, 7060)] for seed in (0, 1)}
    assert choices[0] == [msrvtt.choose_caption(f"video{i}", 20, 0) for i in range(7010, 7060)]
    assert choices[0] != choices[1] and len(set(choices[0])) > 5
    assert all(0 <= c < 20 for c in choices[0] + choices[1])


def test_both_annotation_formats_give_identical_shards(fake_msrvtt, tmp_path):
    single = _build_msrvtt(fake_msrvtt, tmp_path / "single")
    separate = _build_msrvtt(fake_msrvtt, tmp_path / "separate", annotations="separate")
    assert single["splits"] == separate["splits"]
    for shard in single["splits"]["eval"]["shards"]:
        assert (tmp_path / "single" / shard).read_bytes() == (tmp_path / "separate" / shard).read_bytes()


def test_msrvtt_split_all_writes_each_split_under_its_manifest_name(fake_msrvtt, tmp_path):
    manifest = _build_msrvtt(fake_msrvtt, tmp_path, annotations="separate", split="all")
    counts = {name: split["num_clips"] for name, split in manifest["splits"].items()}
    assert counts == {"train": 4, "validate": 2, "eval": 3}
    for name, prefix in (("train", "train"), ("validate", "validate"), ("eval", "test")):
        samples = _read_samples(tmp_path, manifest["splits"][name]["shards"])
        assert all(s["json"]["split"] == prefix for s in samples)
        assert all(shard.startswith(f"{prefix}-") for shard in manifest["splits"][name]["shards"])


def test_msrvtt_rejects_an_unknown_split(fake_msrvtt, tmp_path):
    with pytest.raises(ValueError, match="split='val' is not one of"):
        _build_msrvtt(fake_msrvtt, tmp_path, split="val")


def test_datamodule_streams_each_built_test_clip_once(fake_msrvtt, tmp_path):
    manifest = _build_msrvtt(fake_msrvtt, tmp_path)
    expected = sorted(s["txt"] for s in _read_samples(tmp_path, manifest["splits"]["eval"]["shards"]))
    data = VideoDataModule(
        root=str(tmp_path), build_synthetic=False, num_workers=0, num_frames=8, resolution=16, batch_size=2
    )
    batches = list(data.val_dataloader())
    assert sorted(c for b in batches for c in b["caption"]) == expected
    assert all(b["video"].shape[1:] == (3, 8, 16, 16) and int(b["num_skipped"]) == 0 for b in batches)


@pytest.mark.parametrize("module", [openvid, msrvtt])
def test_every_cli_option_has_help(module):
    actions = [a for a in module.build_parser()._actions if a.dest != "help"]
    assert actions and all(a.help for a in actions), [a.dest for a in actions if not a.help]


def test_build_scripts_run_and_show_help():
    for script in ("build_openvid.py", "build_msrvtt.py"):
        result = subprocess.run([sys.executable, str(REPO / "data" / script), "--help"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "--short-side" in result.stdout and "--workers" in result.stdout
