"""Tests of the data layer: mp4 round trips, the synthetic generator, and the webdataset pipelines."""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds

from tpdiff_lightning.data import datamodule, pipelines, synthetic
from tpdiff_lightning.data.datamodule import VideoDataModule
from tpdiff_lightning.data.decoding import NoUsableClipsError, decode_clip, frames_to_tensor
from tpdiff_lightning.data.lost_clips import CorruptSampleWarning
from tpdiff_lightning.data.pipelines import eval_pipeline, train_pipeline
from tpdiff_lightning.data.synthetic import (
    DIRECTIONS,
    PALETTE,
    SHAPES,
    clip_rng,
    make_clip,
    render_clip,
    synthetic_exists,
    write_synthetic_shards,
)
from tpdiff_lightning.data.video_io import ClipLengthError, decode_mp4, encode_mp4, write_mp4

REPO = Path(__file__).resolve().parents[2]
TINY = dict(num_train=32, num_eval=12, num_frames=8, size=16, seed=0, clips_per_shard=8)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """A tiny synthetic build: 4 train shards and 2 eval shards of 8-frame 16x16 clips."""
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_shards(root, progress=False, **TINY)
    return root


def _write_labelled_shard(
    path: Path, num_good: int, corrupt_at: tuple[int, ...] = (), short_at: tuple[int, ...] = (), prefix: str = ""
) -> set[str]:
    """Write one shard whose good clips have unique captions "clip {prefix}{i}"; return the set of good captions."""
    good = set()
    with wds.TarWriter(str(path)) as sink:
        for i in range(num_good + len(corrupt_at) + len(short_at)):
            frames = render_clip("red", "square", "right", "slow", (i % 16, 8.0), 8, 16)
            if i in corrupt_at:
                mp4 = b"this is not an mp4 file" * 4
            elif i in short_at:
                mp4 = encode_mp4(frames[:3])
            else:
                mp4 = encode_mp4(frames)
                good.add(f"clip {prefix}{i}")
            sink.write({"__key__": f"s{i:04d}", "mp4": mp4, "txt": f"clip {prefix}{i}"})
    return good


def _captions(batches) -> list[str]:
    return [caption for batch in batches for caption in batch["caption"]]


def test_encode_decode_round_trip_keeps_smooth_content():
    frames = render_clip("blue", "circle", "left", "fast", (8.0, 9.0), 8, 32)
    decoded = decode_mp4(encode_mp4(frames, fps=8))
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    error = np.abs(decoded.astype(np.int16) - frames.astype(np.int16))
    assert error.mean() < 6.0, f"mean abs error {error.mean():.2f} too large for smooth content"


def test_decode_mp4_stops_at_max_frames_and_write_mp4_writes_a_file(tmp_path):
    frames = render_clip("green", "square", "up", "slow", (8.0, 8.0), 6, 16)
    path = tmp_path / "sub" / "clip.mp4"
    write_mp4(path, frames, fps=4)
    assert decode_mp4(path.read_bytes()).shape == (6, 16, 16, 3)
    assert decode_mp4(path.read_bytes(), max_frames=2).shape == (2, 16, 16, 3)


def _decode_every_frame_alone(data: bytes) -> np.ndarray:
    """Reference decode: each frame converted to RGB on its own, as PyAV's `to_ndarray(format=...)` does."""
    from io import BytesIO

    import av

    with av.open(BytesIO(data)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_decode_mp4_converts_the_same_pixels_and_only_the_kept_frames():
    frames = render_clip("red", "circle", "right", "fast", (8.0, 8.0), 12, 32)
    data = encode_mp4(frames)
    reference = _decode_every_frame_alone(data)
    np.testing.assert_array_equal(decode_mp4(data), reference)
    seen = []

    def keep(count):
        seen.append(count)
        return range(3, 11, 2)

    np.testing.assert_array_equal(decode_mp4(data, keep=keep), reference[3:11:2])
    assert seen == [12]
    np.testing.assert_array_equal(decode_mp4(data, max_frames=5, keep=lambda n: [n - 1]), reference[[4]])


def test_training_decode_draws_the_same_start_as_decoding_every_frame():
    """The random start is drawn from the decoded frame count before any RGB conversion; the clip and the
    generator's state must be what decoding every frame and slicing gave."""
    frames = render_clip("green", "square", "left", "slow", (8.0, 9.0), 20, 16)
    sample = {"mp4": encode_mp4(frames), "txt": b"a green square"}
    reference = _decode_every_frame_alone(sample["mp4"])
    rng, expected_rng = random.Random(7), random.Random(7)
    for _ in range(5):
        clip = decode_clip(sample, 4, 3, 16, rng)
        start = expected_rng.randint(0, len(reference) - 10)
        torch.testing.assert_close(clip["video"], frames_to_tensor(reference[start : start + 10 : 3], 16))
    assert rng.getstate() == expected_rng.getstate()
    with pytest.raises(ClipLengthError, match="clip has 20 frames, needs 22"):
        decode_clip(sample, 8, 3, 16, rng)
    assert rng.getstate() == expected_rng.getstate()


@pytest.mark.parametrize(
    "frames, expected",
    [
        (np.zeros((4, 15, 16, 3), np.uint8), "H=15"),
        (np.zeros((4, 16, 17, 3), np.uint8), "W=17"),
        (np.zeros((4, 16, 16, 3), np.float32), "float32"),
        (np.zeros((16, 16, 3), np.uint8), "(16, 16, 3)"),
    ],
)
def test_encode_mp4_rejects_bad_frames_naming_the_value(frames, expected):
    with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        encode_mp4(frames)


def test_make_clip_is_deterministic_per_seed():
    first = make_clip(clip_rng(3, "train", 5), 8, 16)
    again = make_clip(clip_rng(3, "train", 5), 8, 16)
    other = make_clip(clip_rng(3, "train", 6), 8, 16)
    np.testing.assert_array_equal(first[0], again[0])
    assert first[1:] == again[1:], (first[1:], again[1:])
    # The same frames encode to the same bytes (x264_options keeps libx264 off its uninitialised read), and decode to
    # frames of the clip's shape.
    once, twice = encode_mp4(first[0]), encode_mp4(first[0])
    assert once == twice
    assert decode_mp4(once).shape == first[0].shape
    assert not np.array_equal(first[0], other[0]) or first[2] != other[2]


def test_clips_encode_without_the_macroblock_tree():
    # With it on, libx264 reads uninitialised stack memory (valgrind) and rebuilds gave other bytes now and then.
    # The encoder's own options string in the mp4 says what ran.
    for size in (16, 32):
        assert b" mbtree=0 " in encode_mp4(make_clip(clip_rng(0, "train", 0), 4, size)[0]), size


def test_make_clip_shape_size_and_caption_match_the_frames():
    frames, caption, meta = make_clip(np.random.default_rng(0), 16, 32)
    assert frames.shape == (16, 32, 32, 3) and frames.dtype == np.uint8
    assert caption == f"a {meta['colour']} {meta['shape']} moving {meta['direction']} {meta['speed']}"
    covered = (np.abs(frames[0].astype(int) - synthetic.BACKGROUND).sum(-1) > 60).mean()
    assert 0.1 < covered < 0.3, f"shape covers {covered:.2f} of the frame; expected a big shape"


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_rendered_motion_follows_the_caption_direction(direction):
    frames = render_clip("yellow", "circle", direction, "fast", (16.0, 16.0), 4, 32)
    mask = np.abs(frames.astype(int) - synthetic.BACKGROUND).sum(-1) > 60  # (F, H, W)
    ys, xs = np.mgrid[:32, :32]
    centroids = np.stack([[(xs * m).sum() / m.sum(), (ys * m).sum() / m.sum()] for m in mask])  # (F, 2)
    velocity = np.diff(centroids, axis=0).mean(0)
    np.testing.assert_allclose(velocity, np.asarray(DIRECTIONS[direction]) * synthetic.SPEEDS["fast"] * 32, atol=0.1)


def test_shapes_stay_whole_inside_the_frame():
    for i in range(50):
        frames, caption, _ = make_clip(clip_rng(0, "train", i), 16, 32)
        mask = np.abs(frames.astype(int) - synthetic.BACKGROUND).sum(-1) > 60  # (F, H, W)
        border = mask[:, 0, :].any() or mask[:, -1, :].any() or mask[:, :, 0].any() or mask[:, :, -1].any()
        assert not border, f"clip {i} ({caption}) touches the border, so its shape is cut"


def test_centred_paths_cross_the_frame_centre_so_the_direction_fixes_every_frame():
    """With paths="centred" the shape's mid-clip position is the frame's centre within 2 px on both axes, whatever
    the direction and speed; "anywhere" paths spread over the frame (the same generator, another rule)."""
    mids = {"centred": [], "anywhere": []}
    for paths in mids:
        for i in range(64):
            _, _, meta = make_clip(clip_rng(0, "train", i), 16, 32, paths=paths)
            vx, vy = DIRECTIONS[meta["direction"]]
            half_travel = meta["speed_px_per_frame"] * 15 / 2
            mids[paths].append((meta["start_xy"][0] + vx * half_travel, meta["start_xy"][1] + vy * half_travel))
    centred, anywhere = np.asarray(mids["centred"]), np.asarray(mids["anywhere"])
    assert np.abs(centred - 16).max() <= synthetic.CENTRED_JITTER + 1e-9
    assert np.abs(anywhere - 16).max() > 4 * synthetic.CENTRED_JITTER
    with pytest.raises(ValueError, match=r"paths='middle' is invalid; expected one of \['anywhere', 'centred'\]"):
        make_clip(clip_rng(0, "train", 0), 4, 16, paths="middle")


def test_synthetic_paths_is_a_build_argument_checked_before_anything_is_written(tmp_path, caplog):
    """Asking a default build for centred paths rebuilds it with a warning naming `paths`; a misspelt value stops
    with one line naming the key before anything is written."""
    kwargs = dict(root=str(tmp_path), num_frames=4, resolution=16, synthetic_num_train=2, synthetic_num_eval=1,
                  build_synthetic=True)
    VideoDataModule(**kwargs).prepare_data()
    assert "paths" not in synthetic.read_manifest(tmp_path)["args"]  # default builds keep their arguments
    with caplog.at_level(logging.WARNING, logger=datamodule.__name__):
        VideoDataModule(**kwargs, synthetic_paths="centred").prepare_data()
    assert "paths=None, but this build asks for paths='centred'" in caplog.records[0].getMessage()
    assert synthetic.read_manifest(tmp_path)["args"]["paths"] == "centred"
    with pytest.raises(ValueError, match=r"^data.init_args.synthetic_paths='centered' is invalid; expected one of "
                                         r"\['anywhere', 'centred'\]$"):
        VideoDataModule(root=str(tmp_path / "new"), build_synthetic=True, synthetic_paths="centered")
    assert not (tmp_path / "new").exists()


def test_captions_cover_every_colour_shape_and_direction():
    metas = [make_clip(clip_rng(0, "train", i), 2, 16)[2] for i in range(200)]
    assert {m["colour"] for m in metas} == set(PALETTE)
    assert {m["shape"] for m in metas} == set(SHAPES)
    assert {m["direction"] for m in metas} == set(DIRECTIONS)
    assert {m["speed"] for m in metas} == {"slow", "fast"}


def test_shards_are_byte_identical_across_builds_and_train_differs_from_eval(tmp_path, tiny_root):
    write_synthetic_shards(tmp_path, progress=False, **TINY)
    for name in ("train-000000.tar", "eval-000001.tar"):
        assert (tmp_path / name).read_bytes() == (tiny_root / name).read_bytes()
    train = make_clip(clip_rng(0, "train", 0), 8, 16)[0]
    evaluation = make_clip(clip_rng(0, "eval", 0), 8, 16)[0]
    assert not np.array_equal(train, evaluation)


def test_manifest_lists_existing_shards_and_synthetic_exists_checks_args(tiny_root):
    manifest = synthetic.read_manifest(tiny_root)
    assert manifest["splits"]["train"] == {"shards": [f"train-{i:06d}.tar" for i in range(4)], "num_clips": 32,
                                           "shard_clips": [8, 8, 8, 8]}
    assert manifest["splits"]["eval"]["num_clips"] == 12 and len(manifest["splits"]["eval"]["shards"]) == 2
    assert all((tiny_root / name).is_file() for s in manifest["splits"].values() for name in s["shards"])
    assert synthetic_exists(tiny_root, **TINY)
    assert not synthetic_exists(tiny_root, **{**TINY, "num_train": 64})
    assert not synthetic_exists(tiny_root / "nowhere", **TINY)


def test_cli_builds_and_prints_summary(tmp_path, capsys):
    out = tmp_path / "cli"
    synthetic.main(["--out", str(out), "--num-train", "4", "--num-eval", "2", "--num-frames", "4",
                    "--size", "16", "--no-progress"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "train: 4 clips in 1 shards" in printed and (out / "manifest.json").is_file()
    synthetic.main(["--out", str(out), "--num-train", "4", "--num-eval", "2", "--num-frames", "4", "--size", "16"])
    assert "nothing to do" in capsys.readouterr().out


def test_make_synthetic_script_has_help():
    result = subprocess.run(
        [sys.executable, str(REPO / "data" / "make_synthetic.py"), "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "--num-train" in result.stdout


def test_odd_synthetic_size_is_rejected_with_the_value(tmp_path):
    with pytest.raises(ValueError, match="got 15"):
        write_synthetic_shards(tmp_path, size=15, progress=False)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_batches_have_the_documented_format(tiny_root, num_workers):
    dm = VideoDataModule(root=str(tiny_root), num_frames=4, frame_stride=2, resolution=16, batch_size=4,
                         num_workers=num_workers, train_steps_per_epoch=4, shuffle_buffer=8)  # fmt: skip
    batches = list(dm.train_dataloader())
    assert len(batches) == 4
    for batch in batches:
        assert batch["video"].shape == (4, 3, 4, 16, 16) and batch["video"].dtype == torch.float32
        assert batch["video"].min() >= -1 and batch["video"].max() <= 1 and batch["video"].std() > 0.1
        assert len(batch["caption"]) == 4 and all(c.startswith("a ") for c in batch["caption"])
        assert batch["num_skipped"].dtype == torch.long and batch["num_skipped"].shape == () and batch["num_skipped"] == 0


def test_eval_stream_yields_every_clip_once_with_workers(tmp_path):
    good = _write_labelled_shard(tmp_path / "eval-000000.tar", 5, prefix="a")
    good |= _write_labelled_shard(tmp_path / "eval-000001.tar", 4, prefix="b")
    dm = VideoDataModule(root=str(tmp_path), eval_shards="eval-{000000..000001}.tar", num_frames=8, resolution=16,
                         batch_size=2, num_workers=2)  # fmt: skip
    captions = _captions(dm.val_dataloader())
    assert Counter(captions) == Counter(good)


def test_eval_stream_splits_clips_across_ranks_exactly_once(tmp_path):
    good = _write_labelled_shard(tmp_path / "a.tar", 7)
    urls = [str(tmp_path / "a.tar")]
    per_rank = [_captions(eval_pipeline(urls, 8, 16, 3, rank=r, world_size=2)) for r in range(2)]
    assert sorted(per_rank[0] + per_rank[1]) == sorted(good)
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 1


def test_eval_stream_takes_the_first_frames_with_stride(tmp_path):
    frames = render_clip("blue", "square", "down", "fast", (4.0, 4.0), 8, 16)
    data = encode_mp4(frames)  # encode once: x264 with threads need not give identical bytes twice
    with wds.TarWriter(str(tmp_path / "e.tar")) as sink:
        sink.write({"__key__": "k", "mp4": data, "txt": "x"})
    batch = next(iter(eval_pipeline([str(tmp_path / "e.tar")], 3, 16, 1, frame_stride=2)))
    expected = frames_to_tensor(decode_mp4(data)[[0, 2, 4]], 16)
    torch.testing.assert_close(batch["video"][0], expected)


def test_corrupt_samples_are_skipped_counted_and_lose_nothing_else(tmp_path):
    good = _write_labelled_shard(tmp_path / "eval-000000.tar", 6, corrupt_at=(2,), short_at=(5,))
    with pytest.warns(CorruptSampleWarning) as record:
        batches = list(eval_pipeline([str(tmp_path / "eval-000000.tar")], 8, 16, 4))
    messages = " ".join(str(w.message) for w in record)
    assert "s0002" in messages and "s0005" in messages and "3 frames, needs 8" in messages
    assert sorted(_captions(batches)) == sorted(good)
    assert sum(int(b["num_skipped"]) for b in batches) == 2


def test_train_clips_start_at_random_frames_and_respect_the_stride(tmp_path):
    levels = 30 + 25 * np.arange(8)  # frame i is a flat grey of level 30 + 25 i, which H.264 keeps exactly
    frames = np.broadcast_to(levels[:, None, None, None], (8, 16, 16, 3)).astype(np.uint8)
    with wds.TarWriter(str(tmp_path / "t.tar")) as sink:
        sink.write({"__key__": "k", "mp4": encode_mp4(frames), "txt": "grey"})
    batches = list(train_pipeline([str(tmp_path / "t.tar")], 3, 16, 4, frame_stride=2).with_epoch(4))
    mean_levels = torch.cat([b["video"] for b in batches]).mean(dim=(1, 3, 4)) * 127.5 + 127.5  # (B, F)
    frame_index = torch.round((mean_levels - 30) / 25)
    assert torch.all(frame_index[:, 1:] - frame_index[:, :-1] == 2)
    assert set(frame_index[:, 0].tolist()) == {0.0, 1.0, 2.0, 3.0}  # span 5 of 8 frames


def test_corrupt_samples_are_counted_in_the_training_stream(tmp_path):
    good = _write_labelled_shard(tmp_path / "t.tar", 6, corrupt_at=(1, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptSampleWarning)
        batches = list(train_pipeline([str(tmp_path / "t.tar")], 8, 16, 3, shuffle_buffer=4).with_epoch(6))
    assert set(_captions(batches)) <= good
    assert sum(int(b["num_skipped"]) for b in batches) > 0


def test_truncated_shard_is_counted_by_the_tar_handler(tmp_path):
    _write_labelled_shard(tmp_path / "full.tar", 6)
    data = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 100])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptSampleWarning)
        batches = list(eval_pipeline([str(tmp_path / "cut.tar"), str(tmp_path / "full.tar")], 8, 16, 16))
    assert sum(int(b["num_skipped"]) for b in batches) >= 1
    assert {f"clip {i}" for i in range(6)} <= set(_captions(batches))


def _first_batches(urls, **kwargs):
    pipeline = train_pipeline(urls, 4, 16, 4, shuffle_buffer=8, **kwargs).with_epoch(2)
    return list(pipeline)


def test_train_stream_is_seeded_by_rank_and_resume_step(tiny_root):
    urls = [str(p) for p in sorted(tiny_root.glob("train-*.tar"))]
    rank0 = _first_batches(urls, rank=0)
    assert _captions(rank0) == _captions(_first_batches(urls, rank=0))
    torch.testing.assert_close(rank0[0]["video"], _first_batches(urls, rank=0)[0]["video"])
    assert _captions(rank0) != _captions(_first_batches(urls, rank=1))
    assert _captions(rank0) != _captions(_first_batches(urls, rank=0, resume_step=100))


def test_set_resume_step_and_trainer_global_step_reseed_the_training_stream(tiny_root):
    def captions(step=None, trainer=None):
        dm = VideoDataModule(root=str(tiny_root), num_frames=4, resolution=16, batch_size=4, num_workers=0,
                             train_steps_per_epoch=2)  # fmt: skip
        dm.trainer = trainer
        if step is not None:
            dm.set_resume_step(step)
        return _captions(dm.train_dataloader())

    resumed_trainer = SimpleNamespace(global_step=500, global_rank=0, world_size=1)
    assert captions() == captions(0)
    assert captions() != captions(500)
    assert captions(trainer=resumed_trainer) == captions(500)
    with pytest.raises(ValueError, match="-1"):
        VideoDataModule().set_resume_step(-1)


def test_missing_shards_raise_file_not_found_with_a_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"manifest\.json.*make_synthetic\.py"):
        VideoDataModule(root=str(tmp_path), build_synthetic=False).train_dataloader()
    with pytest.raises(FileNotFoundError, match=r"train-000001\.tar.*check the train_shards pattern"):
        VideoDataModule(root=str(tmp_path), train_shards="train-{000001..000002}.tar").train_dataloader()


def test_prepare_data_builds_missing_synthetic_data_once(tmp_path):
    dm = VideoDataModule(root=str(tmp_path / "s"), num_frames=4, resolution=16, synthetic_num_train=8,
                         synthetic_num_eval=4, num_workers=0, batch_size=4, build_synthetic=True)  # fmt: skip
    dm.prepare_data()
    manifest_path = tmp_path / "s" / "manifest.json"
    built = manifest_path.stat().st_mtime_ns
    dm.prepare_data()
    assert manifest_path.stat().st_mtime_ns == built
    assert len(_captions(dm.val_dataloader())) == 4


def test_synthetic_data_is_built_only_where_build_synthetic_names(tmp_path, monkeypatch):
    """A mistyped root beside the default config's build_synthetic: data/synthetic is an error, not a synthetic run."""
    monkeypatch.chdir(tmp_path)
    small = dict(num_frames=4, resolution=16, synthetic_num_train=8, synthetic_num_eval=4, num_workers=0)
    typo = VideoDataModule(root="data/nodata", build_synthetic="data/synthetic", **small)
    assert not typo.will_build_synthetic()
    typo.prepare_data()
    assert not (tmp_path / "data").exists()
    with pytest.raises(FileNotFoundError, match=r"no such folder.*built only at build_synthetic=data/synthetic"):
        typo.shard_urls("train")
    named = VideoDataModule(root="data/synthetic", build_synthetic="data/synthetic", **small)
    assert named.will_build_synthetic()
    named.prepare_data()
    assert (tmp_path / "data" / "synthetic" / "manifest.json").is_file()
    assert not VideoDataModule(root="data/other", **small).will_build_synthetic()  # the default: never build


def test_prepare_data_leaves_a_foreign_dataset_alone(tmp_path):
    (tmp_path / "manifest.json").write_text('{"generator": "openvid", "splits": {}}')
    VideoDataModule(root=str(tmp_path)).prepare_data()
    assert not list(tmp_path.glob("*.tar"))


def test_frames_to_tensor_resizes_short_side_and_centre_crops():
    frames = np.zeros((2, 24, 48, 3), np.uint8)
    frames[:, :, 18:30] = 255  # resized to columns 12..20 of 32, i.e. 4..12 of the centre crop
    video = frames_to_tensor(frames, 16)
    assert video.shape == (3, 2, 16, 16)
    torch.testing.assert_close(video[..., 5:11], torch.ones(3, 2, 16, 6))
    torch.testing.assert_close(video[..., :3], -torch.ones(3, 2, 16, 3))


def test_frames_to_tensor_takes_height_and_width_and_keeps_the_aspect_ratio():
    frames = np.zeros((2, 40, 40, 3), np.uint8)
    frames[:, 15:25] = 255  # a horizontal band: rows 15..25 of 40
    video = frames_to_tensor(frames, [16, 32])  # covers 32 wide -> 32x32, crops rows 8..24
    assert video.shape == (3, 2, 16, 32)
    torch.testing.assert_close(video[:, :, 6:10], torch.ones(3, 2, 4, 32))  # band rows 12..20 -> 4..12 of crop
    torch.testing.assert_close(video[:, :, :2], -torch.ones(3, 2, 2, 32))
    torch.testing.assert_close(frames_to_tensor(frames[:, :, :], [40, 40]), frames_to_tensor(frames, 40))


@pytest.mark.parametrize("bad", [0, [16], [16, 0], "16x16", True])
def test_frame_size_rejects_bad_resolutions(bad):
    from tpdiff_lightning.data.frame_size import frame_size

    with pytest.raises(ValueError, match="resolution="):
        frame_size(bad)


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(resolution=0), "resolution.*0"),
        (dict(batch_size=-2), "batch_size.*-2"),
        (dict(seed=-1), "seed=-1"),
        (dict(predict_prompts=[]), "predict_prompts"),
    ],
)
def test_bad_datamodule_args_raise_value_error_naming_them(kwargs, expected):
    with pytest.raises(ValueError, match=expected):
        VideoDataModule(**kwargs)


def test_predict_batches_cover_prompts_times_seeds():
    dm = VideoDataModule(predict_prompts=["a", "b", "c"], predict_seeds_per_prompt=2, batch_size=4, seed=10)
    batches = list(dm.predict_dataloader())
    assert [len(b["caption"]) for b in batches] == [4, 2]
    assert "".join(_captions(batches)) == "aabbcc"
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(6))
    assert torch.cat([b["seed"] for b in batches]).tolist() == list(range(10, 16))
    assert batches[0]["seed"].dtype == torch.long


def test_predict_items_are_padded_to_the_world_size_with_placeholders():
    dm = VideoDataModule(predict_prompts=["a", "b", "c"], predict_seeds_per_prompt=2, batch_size=4, seed=10)
    dm.trainer = SimpleNamespace(world_size=4, global_rank=0)
    batches = list(dm.predict_dataloader())
    assert torch.cat([b["index"] for b in batches]).tolist() == [0, 1, 2, 3, 4, 5, -1, -1]
    assert "".join(_captions(batches)) == "aabbcccc"  # placeholders repeat the last prompt
    dm.trainer = SimpleNamespace(world_size=3, global_rank=0)  # 6 items split evenly already: no placeholder
    assert torch.cat([b["index"] for b in dm.predict_dataloader()]).tolist() == list(range(6))


def test_remote_shard_patterns_are_passed_to_webdataset_unchecked(tmp_path):
    dm = VideoDataModule(root=str(tmp_path), train_shards="pipe:cat /data/train-{000000..000002}.tar",
                         eval_shards="https://example.invalid/eval-{000000..000001}.tar", build_synthetic=False)
    assert dm.shard_urls("train") == [f"pipe:cat /data/train-00000{i}.tar" for i in range(3)]
    assert dm.shard_urls("eval") == [f"https://example.invalid/eval-00000{i}.tar" for i in range(2)]


def test_pipe_urls_stream_real_shards(tmp_path):
    root = tmp_path / "synth"
    write_synthetic_shards(root, num_train=8, num_eval=4, num_frames=8, size=16, clips_per_shard=4, progress=False)
    dm = VideoDataModule(root=str(tmp_path), eval_shards=f"pipe:cat {root}/eval-000000.tar", num_frames=8,
                         resolution=16, batch_size=4, num_workers=0, build_synthetic=False)
    batch = next(iter(dm.val_dataloader()))
    assert batch["video"].shape == (4, 3, 8, 16, 16)


def test_target_fps_sets_the_frame_step_from_the_clip_rate(tmp_path):
    frames = np.repeat(np.arange(24, dtype=np.uint8)[:, None, None, None] * 10, 16, axis=1)
    frames = np.repeat(np.repeat(frames, 16, axis=2), 3, axis=3)  # (24, 16, 16, 3), frame k has value 10k
    sample = {"mp4": encode_mp4(frames, fps=24), "txt": b"grey", "json": json.dumps({"fps": 24}).encode()}
    clip = decode_clip(sample, num_frames=4, frame_stride=1, resolution=16, rng=None, target_fps=8)
    values = ((clip["video"][0, :, 8, 8] + 1) * 127.5).round()
    assert values.tolist() == pytest.approx([0, 30, 60, 90], abs=6)  # every third frame: 24 fps -> 8 fps
    with pytest.raises(ValueError, match="target_fps=0"):
        VideoDataModule(target_fps=0)


def test_two_workers_never_yield_the_same_training_batch(tiny_root):
    dm = VideoDataModule(root=str(tiny_root), num_frames=4, resolution=16, batch_size=4, num_workers=2,
                         train_steps_per_epoch=8, shuffle_buffer=8)
    batches = list(dm.train_dataloader())
    assert len(batches) == 8
    # DataLoader alternates workers: batches 0, 2, 4, 6 come from worker 0 and 1, 3, 5, 7 from worker 1.
    for a in range(0, 8, 2):
        for b in range(1, 8, 2):
            assert not torch.equal(batches[a]["video"], batches[b]["video"])


def _write_frames_shard(path: Path, lengths: list[int], corrupt: int = 0) -> None:
    """One shard of 16x16 clips with the given frame counts (captions "len {n} #{i}"), plus `corrupt` broken mp4s."""
    with wds.TarWriter(str(path)) as sink:
        for i, length in enumerate(lengths):
            frames = render_clip("red", "square", "right", "slow", (8.0, 8.0), length, 16)
            sink.write({"__key__": f"c{i:04d}", "mp4": encode_mp4(frames), "txt": f"len {length} #{i}"})
        for i in range(corrupt):
            sink.write({"__key__": f"x{i:04d}", "mp4": b"not an mp4" * 8, "txt": "corrupt"})


def test_train_stream_without_a_long_enough_clip_raises_naming_the_span(tmp_path, monkeypatch):
    monkeypatch.setattr(pipelines, "MAX_SHORT_BEFORE_FIRST_CLIP", 12)
    _write_frames_shard(tmp_path / "train-000000.tar", [6] * 5 + [7] * 3, corrupt=2)
    dm = VideoDataModule(root=str(tmp_path), train_shards="train-000000.tar", num_frames=4, frame_stride=3,
                         resolution=16, batch_size=2, num_workers=1, build_synthetic=False, shuffle_buffer=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptSampleWarning)
        with pytest.raises(NoUsableClipsError) as info:
            next(iter(dm.train_dataloader()))  # through a worker process: the error reaches the trainer
    message = str(info.value)
    assert "first 12 samples" in message and "a span of 10 frames (num_frames=4 x frame step 3)" in message
    assert "6 frames (" in message and "7 frames (" in message  # the clip lengths seen


def test_train_stream_error_names_the_target_fps_step(tmp_path, monkeypatch):
    monkeypatch.setattr(pipelines, "MAX_SHORT_BEFORE_FIRST_CLIP", 6)
    _write_frames_shard(tmp_path / "t.tar", [8] * 4)  # stored at 8 fps: target_fps=4 steps by 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptSampleWarning)
        with pytest.raises(NoUsableClipsError, match=r"span of 15 frames \(num_frames=8 x frame step 2\).*8 frames"):
            next(iter(train_pipeline([str(tmp_path / "t.tar")], 8, 16, 2, shuffle_buffer=2, target_fps=4)))


def test_short_clips_among_usable_ones_and_corrupt_samples_never_stop_training(tmp_path, monkeypatch):
    monkeypatch.setattr(pipelines, "MAX_SHORT_BEFORE_FIRST_CLIP", 8)
    _write_frames_shard(tmp_path / "short.tar", [3] * 12)  # a whole shard of short clips
    _write_frames_shard(tmp_path / "mixed.tar", [8] * 4 + [3] * 4, corrupt=2)
    urls = [str(tmp_path / "short.tar"), str(tmp_path / "mixed.tar")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptSampleWarning)
        batches = list(train_pipeline(urls, 8, 16, 2, shuffle_buffer=4).with_epoch(12))
    assert len(batches) == 12 and {c.split(" #")[0] for c in _captions(batches)} == {"len 8"}
    skipped = sum(int(b["num_skipped"]) for b in batches)
    assert skipped > 8, f"only {skipped} samples were skipped; the test needs more than the limit"


@pytest.mark.parametrize("target_fps, step", [(None, 2), (4, 2), (3, 3), (8, 1), (30, 1)])
def test_synthetic_build_is_long_enough_for_the_frame_step(target_fps, step):
    dm = VideoDataModule(num_frames=5, frame_stride=2, target_fps=target_fps)
    assert dm._synthetic_args()["num_frames"] == 4 * step + 1  # target_fps replaces frame_stride, as in decoding


def test_target_fps_trains_on_the_synthetic_build_it_makes(tmp_path, monkeypatch):
    monkeypatch.setattr(pipelines, "MAX_SHORT_BEFORE_FIRST_CLIP", 4)
    dm = VideoDataModule(root=str(tmp_path / "s"), num_frames=4, target_fps=4, resolution=16, batch_size=2,
                         num_workers=0, synthetic_num_train=4, synthetic_num_eval=2, train_steps_per_epoch=1,
                         build_synthetic=True)
    dm.prepare_data()
    assert synthetic.read_manifest(tmp_path / "s")["args"]["num_frames"] == 7  # 8 fps clips, step 2
    assert next(iter(dm.train_dataloader()))["video"].shape == (2, 3, 4, 16, 16)


def test_rebuilding_outdated_synthetic_data_logs_which_arguments_differ(tmp_path, caplog):
    kwargs = dict(root=str(tmp_path), num_frames=2, resolution=16, synthetic_num_train=2, synthetic_num_eval=2,
                  build_synthetic=True)
    with caplog.at_level(logging.WARNING, logger=datamodule.__name__):
        VideoDataModule(**kwargs).prepare_data()  # a first build has nothing to explain
        VideoDataModule(**kwargs).prepare_data()  # a matching build is kept
        assert not caplog.records
        VideoDataModule(**{**kwargs, "synthetic_num_eval": 1}).prepare_data()
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "rebuilding" in message and str(tmp_path) in message and "\n" not in message
    assert "built with num_eval=2, but this build asks for num_eval=1" in message and "num_train" not in message
    assert synthetic.read_manifest(tmp_path)["splits"]["eval"]["num_clips"] == 1


def test_synthetic_data_drawn_by_another_generator_version_is_rebuilt(tmp_path, caplog, monkeypatch):
    """The manifest records a fingerprint of what the clips show; shards from an edited generator (here a changed
    speed, with every argument the same) are not reused as if they were this generator's."""
    kwargs = dict(root=str(tmp_path), num_frames=4, resolution=16, synthetic_num_train=2, synthetic_num_eval=1,
                  build_synthetic=True)
    VideoDataModule(**kwargs).prepare_data()
    before = (tmp_path / "train-000000.tar").read_bytes()
    assert synthetic.read_manifest(tmp_path)["content"] == synthetic.content_fingerprint()
    monkeypatch.setitem(synthetic.SPEEDS, "slow", 0.3 / 32)
    monkeypatch.setitem(synthetic.SPEEDS, "fast", 2.4 / 32)
    assert "another version of the generator" in synthetic.synthetic_mismatch(
        tmp_path, num_train=2, num_eval=1, num_frames=4, size=16)
    with caplog.at_level(logging.WARNING, logger=datamodule.__name__):
        VideoDataModule(**kwargs).prepare_data()
    assert len(caplog.records) == 1 and "another version of the generator" in caplog.records[0].getMessage()
    assert (tmp_path / "train-000000.tar").read_bytes() != before
    assert synthetic.synthetic_mismatch(tmp_path, num_train=2, num_eval=1, num_frames=4, size=16) is None


def test_make_synthetic_says_why_it_rebuilds_and_refuses_a_real_dataset(tmp_path, capsys):
    args = ["--out", str(tmp_path / "s"), "--num-train", "1", "--num-eval", "1", "--num-frames", "2", "--size", "16",
            "--no-progress"]  # fmt: skip
    synthetic.main(args)
    synthetic.main([*args, "--num-eval", "2"])
    printed = capsys.readouterr().out
    assert "rebuilding synthetic data" in printed and "num_eval=1, but this build asks for num_eval=2" in printed
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "manifest.json").write_text('{"generator": "tpdiff_lightning.data.openvid", "splits": {}}')
    with pytest.raises(SystemExit, match="tpdiff_lightning.data.openvid"):
        synthetic.main(["--out", str(tmp_path / "real"), "--no-progress"])
    assert not list((tmp_path / "real").glob("*.tar"))


def test_odd_resolution_for_synthetic_data_names_resolution(tmp_path):
    with pytest.raises(ValueError, match=r"resolution=31 .*expected an even frame side >= 4.*got 31"):
        VideoDataModule(root=str(tmp_path), resolution=31, build_synthetic=True).prepare_data()
    assert not (tmp_path / "manifest.json").exists()


def test_missing_split_of_a_real_dataset_names_the_real_options(tmp_path):
    manifest = {"generator": "tpdiff_lightning.data.openvid", "splits": {"train": {"shards": [], "num_clips": 0}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FileNotFoundError) as info:
        VideoDataModule(root=str(tmp_path)).val_dataloader()
    message = str(info.value)
    assert "'eval'" in message and str(tmp_path) in message and "['train']" in message
    assert "--data.init_args.eval_shards" in message and "--trainer.limit_val_batches=0" in message
    assert "make_synthetic" not in message and "build_synthetic" not in message


def test_missing_split_of_a_synthetic_root_keeps_the_synthetic_hint(tmp_path):
    manifest = {"generator": synthetic.GENERATOR_NAME, "splits": {"train": {"shards": [], "num_clips": 0}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FileNotFoundError, match=r"no 'eval' split.*make_synthetic\.py"):
        VideoDataModule(root=str(tmp_path), build_synthetic=False).val_dataloader()

