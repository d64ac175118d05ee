"""What moving sampling steps between stages costs in quality: one checkpoint, several `sampling.step_weights`.

    python bench/step_split_quality.py --checkpoint outputs/convergence/tpdiff-flow-spatiotemporal-s0/checkpoints/last.ckpt
    python bench/step_split_quality.py --checkpoint CKPT --splits "1,1,1;2,2,1;1,1,2" --steps 30 --videos 64

The same prompts (the captions of the first ``--videos`` eval clips) and seeds are sampled with every split, so
the FVD differences are not prompt or noise draws. Reported per split: the steps per stage, the backbone's
sampling FLOPs relative to the first split (``torch`` FLOP counts at each stage's shape), FVD against those eval
clips (I3D), and how often the clip shows its caption's colour and direction (``tpdiff_lightning.data.caption_accuracy``).
Prints a table and writes ``bench/results/step_split_quality.json``.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any

import torch

from common import ROOT, count_flops, finish_machine_info, machine_info, print_table, write_json
from tpdiff_lightning.data.caption_accuracy import caption_factors, clip_report
from tpdiff_lightning.data.pipelines import eval_pipeline
from tpdiff_lightning.data.synthetic import read_manifest
from tpdiff_lightning.method.sampling import split_steps
from tpdiff_lightning.metrics.fvd import FVD
from tpdiff_lightning.metrics.i3d import i3d_features, load_i3d
from tpdiff_lightning.training.module import TPDiffModule, to_uint8_video


def parse_splits(text: str) -> list[list[float]]:
    """``"1,1,1;2,2,1"`` -> ``[[1, 1, 1], [2, 2, 1]]``."""
    return [[float(w) for w in part.split(",")] for part in text.split(";") if part.strip()]


def real_clips(root: Path, num_videos: int, num_frames: int, resolution) -> tuple[list[str], torch.Tensor]:
    """Captions and uint8 clips ``(N, F, H, W, 3)`` of the first ``num_videos`` eval clips."""
    manifest = read_manifest(root)
    if manifest is None or "eval" not in manifest.get("splits", {}):
        raise SystemExit(f"--eval-root {root}: no manifest.json with an eval split")
    urls = [str(root / s) for s in manifest["splits"]["eval"]["shards"]]
    captions, clips = [], []
    for batch in eval_pipeline(urls, num_frames, resolution, 8):
        captions += batch["caption"]
        clips.append(to_uint8_video(batch["video"]))
        if len(captions) >= num_videos:
            break
    if len(captions) < num_videos:
        raise SystemExit(f"--videos {num_videos}: the eval split has only {len(captions)} clips")
    return captions[:num_videos], torch.cat(clips)[:num_videos]


def stage_forward_flops(model: TPDiffModule) -> list[float]:
    """Backbone forward FLOPs of one clip at each stage's shape (guidance doubles all alike)."""
    H, W = model.latent_size()
    text, mask = model.text_encoder(["a red square moving left fast"])
    out = []
    for stage in model.pyramid.stages:
        x = torch.zeros(1, model.codec.latent_channels, stage.num_frames, *model.pyramid.stage_size(H, W, stage.index))
        with torch.no_grad():
            out.append(count_flops(lambda: model.backbone(x, torch.full((1,), 500.0), text, mask,
                                                          **model.stage_strides(stage))))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--splits", default="1,1,1;2,2,1;1,1,2", help="step weights per stage, ';' between splits")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--videos", type=int, default=64, help="generated and real clips for FVD")
    parser.add_argument("--eval-root", default=str(ROOT / "data" / "synthetic"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "step_split_quality.json"))
    args = parser.parse_args(argv)
    splits = parse_splits(args.splits)
    info = machine_info()
    model = TPDiffModule.load_from_checkpoint(args.checkpoint, map_location="cpu").eval()
    if any(len(s) != model.pyramid.num_stages for s in splits):
        parser.error(f"--splits {args.splits!r}: expected {model.pyramid.num_stages} weights per split")
    if args.videos < 2 or args.steps < model.pyramid.num_stages:
        parser.error(f"--videos {args.videos} --steps {args.steps}: expected >= 2 videos and >= 1 step per stage")
    clip = model.settings.clip
    captions, real = real_clips(Path(args.eval_root), args.videos, clip.num_frames, clip.resolution)
    i3d = functools.partial(i3d_features, load_i3d())  # one I3D for every metric
    reference = FVD(i3d)
    reference.add_features(reference.features(real), real=True)
    real_stats = reference.real_statistics()
    per_stage = stage_forward_flops(model)
    seeds = [args.seed + i for i in range(args.videos)]
    rows, results = [], []
    for weights in splits:
        steps = split_steps(args.steps, weights)
        with torch.no_grad():
            clips = to_uint8_video(model.generate(captions, seeds, num_steps=args.steps, step_weights=weights))
        metric = FVD(i3d)
        metric.set_real_statistics(*real_stats)
        metric.update(clips, real=False)
        fvd = float(metric.compute())
        reports = [clip_report(clip.numpy(), *caption_factors(c)) for clip, c in zip(clips, captions)]
        flops = sum(f * n for f, n in zip(per_stage, steps))
        results.append({"step_weights": weights, "steps": steps, "sampling_flops": flops, "fvd": fvd,
                        "colour_ok": sum(r["colour_ok"] for r in reports) / len(reports),
                        "direction_ok": sum(r["direction_ok"] for r in reports) / len(reports)})
    base = results[0]["sampling_flops"]
    for r in results:
        r["flops_relative"] = r["sampling_flops"] / base
        rows.append([":".join(f"{w:g}" for w in r["step_weights"]), "-".join(map(str, r["steps"])),
                     f"{r['flops_relative']:.2f}", f"{r['fvd']:.0f}", f"{r['colour_ok']:.0%}", f"{r['direction_ok']:.0%}"])
    print(f"{args.checkpoint}: {args.videos} eval captions, seeds {seeds[0]}..{seeds[-1]}, {args.steps} steps")
    table = print_table(["step weights", "steps per stage", "sampling FLOPs", f"FVD (N={args.videos})",
                         "colour right", "direction right"], rows)
    result = {"bench": "step_split_quality", "checkpoint": str(args.checkpoint), "num_videos": args.videos,
              "num_steps": args.steps, "stage_forward_flops": per_stage, "results": results, "table": table,
              "machine": finish_machine_info(info)}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
