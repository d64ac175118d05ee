"""MSR-VTT as webdataset shards with one seeded caption per clip, for zero-shot text-to-video FVD.

Reads either `train_val_videodatainfo.json` / `test_videodatainfo.json` or the single `MSRVTT_data.json`
(CLIP4Clip packaging); all have `videos: [{video_id, split}]` and `sentences: [{video_id, caption, sen_id}]`.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from tpdiff_lightning.data.shard_writing import (
    ClipSource,
    Reencode,
    add_writer_arguments,
    build_shards,
    run_builder,
    sample_key,
)

GENERATOR_NAME = "tpdiff_lightning.data.msrvtt"
SPLITS = ("train", "validate", "test")
# MSR-VTT clips are short 320x240 videos (about 1-3 MB), so this gives tars of a few hundred MB.
CLIPS_PER_SHARD = 250
# Manifest split names as VideoDataModule reads them: the test clips are the evaluation set ("eval").
SPLIT_ROLES = {"train": "train", "validate": "validate", "test": "eval"}


def _read_annotation_file(path: str | Path) -> dict:
    """Load one annotation JSON and check that it has the `videos` and `sentences` lists."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("videos", "sentences")):
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: expected an object with `videos` and `sentences` lists, got {got}")
    return data


def load_annotations(paths: list[str | Path]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Merge annotation files into (video_id -> split, video_id -> captions ordered by sen_id)."""
    splits: dict[str, str] = {}
    sentences: dict[str, dict] = {}
    for path in paths:
        data = _read_annotation_file(path)
        for video in data["videos"]:
            video_id, split = video["video_id"], video["split"]
            if splits.setdefault(video_id, split) != split:
                raise ValueError(f"{path}: {video_id} is in split {split!r} here but {splits[video_id]!r} elsewhere")
        for sentence in data["sentences"]:
            # Keyed by sen_id so the same sentence listed in two files counts once.
            sentences.setdefault(sentence["video_id"], {})[sentence["sen_id"]] = sentence["caption"]
    captions = {video_id: [by_id[k] for k in sorted(by_id)] for video_id, by_id in sentences.items()}
    return splits, captions


def choose_caption(video_id: str, num_captions: int, seed: int) -> int:
    """Seeded index of the caption used for `video_id`; it depends on nothing else, so subsets agree."""
    # A string seed goes through SHA-512 in `random`, so it is stable across processes and Python runs.
    return random.Random(f"{seed}/{video_id}").randrange(num_captions)


def _natural_order(video_id: str) -> tuple[int, str]:
    """Sort key that puts video9 before video10."""
    return len(video_id), video_id


def clip_sources(
    splits: dict[str, str], captions: dict[str, list[str]], split: str, video_dir: str | Path, seed: int
) -> tuple[list[ClipSource], dict]:
    """The clips of `split` (natural video_id order) with their chosen caption, and counts of what was left out."""
    video_ids = sorted((v for v, s in splits.items() if s == split), key=_natural_order)
    sources, without_captions = [], 0
    for video_id in video_ids:
        texts = captions.get(video_id, [])
        if not texts:
            without_captions += 1
            continue
        index = choose_caption(video_id, len(texts), seed)
        meta = {"source": "msr-vtt", "video_id": video_id, "split": split, "captions": texts, "caption_index": index}
        path = Path(video_dir) / f"{video_id}.mp4"
        sources.append(ClipSource(key=sample_key(video_id), path=str(path), caption=texts[index], meta=meta))
    return sources, {"videos": len(video_ids), "without_captions": without_captions}


def build_msrvtt(
    annotations: list[str | Path],
    videos: str | Path,
    out: str | Path,
    split: str = "test",
    seed: int = 0,
    clips_per_shard: int = CLIPS_PER_SHARD,
    reencode: Reencode | None = None,
    workers: int = 0,
    progress: bool = True,
) -> dict:
    """Write MSR-VTT `split` ("all": every split) as `<split>-%06d.tar` shards plus `manifest.json`; return it."""
    if split not in (*SPLITS, "all"):
        raise ValueError(f"split={split!r} is not one of {(*SPLITS, 'all')}")
    if not annotations:
        raise ValueError("no annotation files given; expected MSRVTT_data.json or the *_videodatainfo.json files")
    if not Path(videos).is_dir():
        raise FileNotFoundError(f"video folder {videos} does not exist; expected the folder of <video_id>.mp4 files")
    video_splits, captions = load_annotations(annotations)
    chosen = SPLITS if split == "all" else (split,)
    splits, stats = {}, {"annotated_videos": len(video_splits)}
    for name in chosen:
        sources, stats[name] = clip_sources(video_splits, captions, name, videos, seed)
        splits[SPLIT_ROLES[name]] = (name, sources)
    args = dict(annotations=[str(p) for p in annotations], videos=str(videos), split=split, seed=seed)
    return build_shards(out, GENERATOR_NAME, args, splits, stats, clips_per_shard, reencode, workers, progress)


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser of `data/build_msrvtt.py`."""
    parser = argparse.ArgumentParser(
        description="Write MSR-VTT clips as resumable webdataset shards (<split>-*.tar of mp4/txt/json, manifest.json) "
        "with one seeded caption per clip in txt and all captions in json. The test split is listed as `eval` "
        "in the manifest, which is the split VideoDataModule evaluates on."
    )
    parser.add_argument(
        "--annotations",
        nargs="+",
        required=True,
        help="MSRVTT_data.json, or train_val_videodatainfo.json and/or test_videodatainfo.json",
    )
    parser.add_argument("--videos", required=True, help="folder holding <video_id>.mp4 files")
    parser.add_argument(
        "--split",
        choices=(*SPLITS, "all"),
        default="test",
        help="which split to write; all writes each one (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of each clip's caption choice (default: %(default)s)")
    add_writer_arguments(parser, default_out="data/msrvtt", clips_per_shard=CLIPS_PER_SHARD)
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Build MSR-VTT shards from command-line arguments, print a summary and return the manifest."""
    opts = build_parser().parse_args(argv)
    return run_builder(
        build_msrvtt, opts, annotations=opts.annotations, videos=opts.videos, split=opts.split, seed=opts.seed
    )


if __name__ == "__main__":
    main()
