"""Encode a dataset's clips once with a config's codec (and frozen text encoder) into latent shards.

    python data/encode_latents.py --config configs/default.yaml --out data/latents
    python lightning_cli.py fit --config configs/default.yaml --data.init_args.root data/latents

Clips are read with the config's data settings (clip length, resolution, frame step), each clip once
from its first frame, so training from latents loses the random clip start of raw-video training.
Caption embeddings are stored only when the text encoder is frozen: a trained one would make them stale.
With ``data.init_args.buckets`` in the config, the train split is encoded per bucket: each clip at the bucket
nearest its shape (resized to cover it and centre-cropped), the bucket named in its metadata and counted in the
manifest; the other splits stay at ``num_frames`` x ``resolution``, the evaluation shape.
Every requested split is checked before any is encoded; encoding a split again into the same folder
replaces that split's shards, and the new manifest lists only the splits of this run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tpdiff_lightning.data.datamodule import VideoDataModule
from tpdiff_lightning.data.latent_cache import encode_split, write_latent_manifest
from tpdiff_lightning.data.pipelines import bucketed_eval_pipeline, eval_pipeline
from tpdiff_lightning.data.synthetic import read_manifest

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True,
                        help="LightningCLI config(s) naming the model (codec, text encoder) and data; repeatable")
    parser.add_argument("--out", type=Path, required=True, help="folder for the latent shards and manifest.json")
    parser.add_argument("--splits", nargs="+", default=["train", "eval"], help="splits of the data to encode")
    parser.add_argument("--ckpt", default=None, help="checkpoint whose codec/text-encoder weights to use")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="storage type of the latents")
    parser.add_argument("--text-embeddings", choices=["auto", "yes", "no"], default="auto",
                        help="store caption embeddings: auto = only for a frozen text encoder")
    parser.add_argument("--clips-per-shard", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="where to run the codec, e.g. cuda")
    return parser


def split_urls(data: VideoDataModule, splits: list[str], out: Path) -> dict[str, list[str]]:
    """The shard URLs of every split to encode, or SystemExit naming a missing split before anything is written."""
    if len(set(splits)) != len(splits):
        raise SystemExit(f"--splits {' '.join(splits)} names a split twice; expected each split once")
    if out.resolve() == data.root.resolve():
        raise SystemExit(f"--out {out} is the data root the clips are read from; choose another folder")
    manifest = read_manifest(data.root)
    listed = sorted(manifest.get("splits", {})) if manifest else []
    urls = {}
    for split in splits:
        from_manifest = (data.train_shards if split == "train" else data.eval_shards) is None
        if from_manifest and manifest is not None and split not in listed:
            raise SystemExit(f"cannot encode split {split!r}: {data.root / 'manifest.json'} lists no such split "
                             f"(it has {listed}); nothing was encoded. Pass --splits with the splits to encode, "
                             f"e.g. --splits {' '.join(listed) or 'train'}")
        try:
            urls[split] = data.shard_urls(split)
        except FileNotFoundError as exn:
            raise SystemExit(f"cannot encode split {split!r} of {data.root}: {exn}; nothing was encoded") from exn
    inside = [u for us in urls.values() for u in us if "://" not in u and not u.startswith("pipe:")
              and Path(u).resolve().parent == out.resolve()]
    if inside:
        raise SystemExit(f"--out {out} holds shards this run reads ({inside[0]}); encoding would replace them. "
                         "Choose another folder")
    return urls


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from tpdiff_lightning.cli.main import main as cli_main

    cli = cli_main(sum((["--config", c] for c in args.config), []), run=False)
    module, data = cli.model, cli.datamodule
    data.prepare_data()
    urls = split_urls(data, args.splits, args.out)  # every split is checked before any is encoded
    if args.ckpt:
        state = torch.load(args.ckpt, map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(state)
    module = module.to(args.device).eval()
    frozen = not any(p.requires_grad for p in module.text_encoder.parameters())
    if args.text_embeddings == "yes" and not frozen:
        raise SystemExit("--text-embeddings yes needs a frozen text encoder; this config trains it")
    text_encoder = module.text_encoder if (args.text_embeddings == "yes" or (args.text_embeddings == "auto" and frozen)) else None
    # Drop the manifest first so an interrupted encoding is never mistaken for a finished one.
    (args.out / "manifest.json").unlink(missing_ok=True)
    splits = {}
    for split in args.splits:
        if split == "train" and data.buckets:  # a latent cache per bucket; evaluation keeps its one shape
            batches = bucketed_eval_pipeline(urls[split], data.buckets, args.batch_size,
                                             frame_stride=data.frame_stride, target_fps=data.target_fps)
        else:
            batches = eval_pipeline(urls[split], data.num_frames, data.resolution, args.batch_size,
                                    frame_stride=data.frame_stride, target_fps=data.target_fps)
        splits[split] = encode_split(module.codec, text_encoder, batches, args.out, split, args.clips_per_shard,
                                     DTYPES[args.dtype])
    for split, entry in splits.items():
        shapes = ", ".join(f"{shape}: {n}" for shape, n in entry["buckets"].items())
        print(f"{split}: {entry['num_clips']} clips in {len(entry['shards'])} shards ({shapes}), "
              f"{entry['skipped']} skipped")
    empty = {split: entry["skipped"] for split, entry in splits.items() if entry["num_clips"] == 0}
    if empty:  # no manifest: an empty latent folder must not pass for a finished one
        raise SystemExit(f"no clips were encoded for {sorted(empty)} ({empty} samples skipped); check num_frames, "
                         f"frame_stride and target_fps against the clips of {data.root}")
    manifest = write_latent_manifest(args.out, splits, module.codec, text_encoder, source=str(data.root))
    print(f"wrote {args.out / 'manifest.json'}")
    return manifest


if __name__ == "__main__":
    main()
