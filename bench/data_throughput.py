"""Clips per second of the raw-video training pipeline: shard read, PyAV decode, random start, resize/crop, batching.

    python bench/data_throughput.py               # 16 frames at 256x256 for 0, 1, 2 workers, plus the default 32x32
    python bench/data_throughput.py --quick       # a smoke run of well under a minute

Builds synthetic webdataset shards in a temporary folder, then times `VideoDataModule.train_dataloader()`:
the first batch (worker start-up and shuffle-buffer fill) is timed apart, and once every worker has
delivered one batch the next ``--batches`` give clips/s. Repeats alternate between the cases so that
machine noise hits all alike; the table shows medians.
The default 32x32 row is set against the default CPU training step's demand, to show whether one worker
keeps up. Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import webdataset as wds

from common import parse_bench_args
from tpdiff_lightning.data.datamodule import VideoDataModule
from tpdiff_lightning.data.latent_cache import latent_sample
from tpdiff_lightning.data.synthetic import write_synthetic_shards


@dataclass
class Case:
    """One timed loader: shards of `clip_frames`-frame clips at `size`, read as `num_frames` at `resolution`."""

    name: str
    size: int
    clip_frames: int
    num_frames: int
    resolution: int
    batch_size: int
    num_workers: int
    batches: int
    latent: bool = False


def build_shards(root: Path, case: Case, num_clips: int) -> float:
    """Write `num_clips` synthetic training clips for `case` into `root`; return the seconds it took.

    A latent case writes latent shards of the shape an SD-style VAE gives these clips (4 channels,
    8x smaller frames, float16), the format `data/encode_latents.py` writes.
    """
    start = time.perf_counter()
    if case.latent:
        write_vae_sized_latents(root, case, num_clips)
    else:
        write_synthetic_shards(root, num_train=num_clips, num_eval=1, num_frames=case.clip_frames, size=case.size,
                               clips_per_shard=16, progress=False)
    return time.perf_counter() - start


def write_vae_sized_latents(root: Path, case: Case, num_clips: int) -> None:
    """Random float16 latents (4, F, size/8, size/8) in latent shards with a manifest."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    meta = {"codec": {"class": "sd-vae-sized", "latent_channels": 4}, "text_encoder": None}
    with wds.ShardWriter(str(root / "train-%06d.tar"), maxcount=16, verbose=0) as sink:
        for k in range(num_clips):
            latent = torch.randn(4, case.clip_frames, case.size // 8, case.size // 8, generator=g).half()
            sink.write(latent_sample(f"clip{k:06d}", latent, "a caption", meta, None))
    shards = sorted(p.name for p in root.glob("train-*.tar"))
    (root / "manifest.json").write_text(json.dumps(
        {"format": "latent", "splits": {"train": {"shards": shards, "num_clips": num_clips}}}))


def time_loader(root: Path, case: Case) -> dict:
    """Time the first batch, skip one batch per worker, then time `case.batches` more."""
    dm = VideoDataModule(root=str(root), num_frames=case.num_frames, resolution=case.resolution,
                         batch_size=case.batch_size, num_workers=case.num_workers,
                         train_steps_per_epoch=case.batches + 2 * max(1, case.num_workers), build_synthetic=False)
    dm.set_resume_step(0)
    loader = dm.train_dataloader()
    start = time.perf_counter()
    batches = iter(loader)
    skipped = int(next(batches)["num_skipped"])
    startup_s = time.perf_counter() - start
    # Workers start together, so their first batches land together; timing from the last of them avoids
    # counting batches that were already prefetched.
    for _ in range(case.num_workers - 1):
        skipped += int(next(batches)["num_skipped"])
    start = time.perf_counter()
    for _ in range(case.batches):
        batch = next(batches)
        skipped += int(batch["num_skipped"])
    elapsed = time.perf_counter() - start
    if case.latent:
        expected = (case.batch_size, 4, case.num_frames, case.resolution // 8, case.resolution // 8)
    else:
        expected = (case.batch_size, 3, case.num_frames, case.resolution, case.resolution)
    key = "latent" if case.latent else "video"
    if tuple(batch[key].shape) != expected:
        raise RuntimeError(f"batch {key} has shape {tuple(batch[key].shape)}, expected {expected}")
    if skipped:  # a dropped clip would inflate clips/s
        raise RuntimeError(f"{case.name}: the pipeline dropped {skipped} clips; see the warnings above")
    del batches, loader  # persistent workers stop here, before the next case starts its own
    gc.collect()
    clips = case.batches * case.batch_size
    return {"startup_s": startup_s, "timed_s": elapsed, "clips_per_s": clips / elapsed, "num_skipped": skipped}


def summarise(case: Case, runs: list[dict]) -> dict:
    """One table row: the case, median start-up and clips/s over its repeats, and every repeat."""
    return {**asdict(case), "startup_s": statistics.median(r["startup_s"] for r in runs),
            "clips_per_s": statistics.median(r["clips_per_s"] for r in runs), "runs": runs}


def print_table(rows: list[dict], default: Case, demand: float) -> None:
    """Print one line per row, the `default` row against the training demand, and the demand itself."""
    print(f"{'':30s}{'frames':>7s}{'res':>5s}{'batch':>6s}{'workers':>8s}{'start-up s':>11s}{'clips/s':>9s}"
          f"{'vs train':>10s}")
    for row in rows:
        ratio = f"{row['clips_per_s'] / demand:9.1f}x" if row["name"] == default.name else ""
        print(f"{row['name']:30s}{row['num_frames']:7d}{row['resolution']:5d}{row['batch_size']:6d}"
              f"{row['num_workers']:8d}{row['startup_s']:11.2f}{row['clips_per_s']:9.1f}{ratio}")
    print(f"{'default CPU train step demand':30s}{default.num_frames:7d}{default.resolution:5d}"
          f"{default.batch_size:6d}{'':19s}{demand:9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=96, help="synthetic clips written per resolution")
    parser.add_argument("--clip-frames", type=int, default=24, help="frames per written 256x256 clip")
    parser.add_argument("--batches", type=int, default=12, help="timed batches per 256x256 case, after the first")
    parser.add_argument("--default-batches", type=int, default=30, help="timed batches of the default 32x32 case")
    parser.add_argument("--repeats", type=int, default=3, help="timed loaders per case, interleaved; medians reported")
    parser.add_argument("--train-clips-per-s", type=float, default=64.0,
                        help="clips/s the default CPU training step consumes (about 4 steps/s at batch 16)")
    parser.add_argument("--quick", action="store_true",
                        help="24 clips, 3 batches per 256x256 case, 10 at 32x32, 1 repeat")
    parser.add_argument("--out", default="bench/results/data_throughput.json")
    args = parse_bench_args(parser)
    if args.quick:
        args.clips, args.batches, args.default_batches, args.repeats = 24, 3, 10, 1
    for name in ("clips", "clip_frames", "batches", "default_batches", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.clip_frames < 16:
        parser.error(f"--clip-frames must be >= 16 (the clip length read), got {args.clip_frames}")

    cases = [Case(f"raw mp4, {w} worker{'s' * (w != 1)}", 256, args.clip_frames, 16, 256, 8, w, args.batches)
             for w in (0, 1, 2)]
    # The default config's own data: 16-frame clips at 32x32, read whole, batch 16, one worker.
    default = Case("raw mp4, default config", 32, 16, 16, 32, 16, 1, args.default_batches)
    cases.append(default)
    # The same 256x256 clips after the latent cache of an SD-style VAE: (4, 16, 32, 32) float16 per clip.
    latent = Case("latent shards, 1 worker", 256, 16, 16, 256, 8, 1, args.batches, latent=True)
    cases.append(latent)
    load_before = os.getloadavg()
    build_s, runs = {}, {case.name: [] for case in cases}
    with tempfile.TemporaryDirectory() as tmp:
        roots = {case.name: Path(tmp) / f"{case.size}px-{case.clip_frames}f{'-latent' * case.latent}" for case in cases}
        for case in cases:
            if not roots[case.name].exists():
                build_s[roots[case.name].name] = build_shards(roots[case.name], case, args.clips)
        for _ in range(args.repeats):
            for case in cases:
                runs[case.name].append(time_loader(roots[case.name], case))
    rows = [summarise(case, runs[case.name]) for case in cases]
    raw_1 = next(row for row in rows if row["name"] == "raw mp4, 1 worker")
    latent_row = next(row for row in rows if row["name"] == latent.name)
    latent_speedup = latent_row["clips_per_s"] / raw_1["clips_per_s"]

    default_row = next(row for row in rows if row["name"] == default.name)
    result = {
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(), "loadavg_1m": {"before": load_before[0], "after": os.getloadavg()[0]},
        "config": vars(args), "build_s": build_s, "rows": rows,
        "train_demand_clips_per_s": args.train_clips_per_s,
        "default_headroom": default_row["clips_per_s"] / args.train_clips_per_s,
        "latent_speedup_vs_raw_1_worker": latent_speedup,
    }
    print_table(rows, default, args.train_clips_per_s)
    print(f"latent shards read {latent_speedup:.1f}x as fast as raw mp4 decode (1 worker each, 256x256)")
    print(f"shard build (s): {', '.join(f'{k} {v:.1f}' for k, v in build_s.items())}; "
          f"1-min load average {load_before[0]:.2f} before, {result['loadavg_1m']['after']:.2f} after")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
