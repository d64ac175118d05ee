"""What does a checkpoint predict where the input is pure noise, against the best any caption-reading model can do?

    python bench/noisy_end_probe.py outputs/synthetic/tpdiff-flow/checkpoints/last.ckpt
    python bench/noisy_end_probe.py CKPT --data-root data/synthetic --train-clips 2048

At the start of the noisiest stage (flow, t = 1) the input holds nothing of the clip, so the loss-minimising
prediction is the stage target with the clip replaced by its mean over all clips with the same caption. That mean is
computed here from the data root's training split, grouped by each caption factor in turn (colour, direction,
shape, speed), by the whole caption, and not at all; each group's mean is a predictor, scored on the eval split with
the same noise as the model. The model's loss against these says whether it has learnt what the clips look like on
average (the mean of all clips) and how much of each word it uses where only the word can place the shape: the gap
between "mean by direction" and "mean of all clips" is what knowing the direction is worth there. The model is also
scored with the direction word swapped. EMA weights, alignment off (sampling draws independent noise). Flow
checkpoints of the synthetic dataset only. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from caption_probe import SWAPS, swapped
from common import ROOT, finish_machine_info, machine_info, print_table, write_json
from tpdiff_lightning.data.pipelines import eval_pipeline
from tpdiff_lightning.data.synthetic import read_manifest
from tpdiff_lightning.training.module import TPDiffModule

FACTORS = ("colour", "shape", "direction", "speed")  # the word order of "a red circle moving left fast"


def caption_factors(caption: str) -> dict[str, str]:
    """The four factors of a synthetic caption ``"a {colour} {shape} moving {direction} {speed}"``."""
    words = caption.split()
    if len(words) != 6 or words[0] != "a" or words[3] != "moving":
        raise ValueError(f"caption {caption!r} is not a synthetic one; expected 'a COLOUR SHAPE moving DIRECTION SPEED'")
    return dict(zip(FACTORS, (words[1], words[2], words[4], words[5])))


def group_key(caption: str, factor: str) -> str:
    """The group a clip's mean is taken over: one factor's value, the whole caption, or one group for every clip."""
    if factor == "all":
        return ""
    return caption if factor == "caption" else caption_factors(caption)[factor]


def clips(model: TPDiffModule, root: Path, split: str, limit: int):
    """Yield ``(captions, latents)`` batches of up to ``limit`` clips of ``split`` under ``root``."""
    manifest = read_manifest(root)
    if manifest is None or split not in manifest.get("splits", {}):
        raise SystemExit(f"--data-root {root}: expected synthetic shards with a {split} split")
    clip = model.settings.clip
    urls = [str(root / s) for s in manifest["splits"][split]["shards"]]
    seen = 0
    for batch in eval_pipeline(urls, clip.num_frames, clip.resolution, 64):
        take = min(len(batch["caption"]), limit - seen)
        yield batch["caption"][:take], model.batch_latents({"video": batch["video"][:take]})
        seen += take
        if seen >= limit:
            return


def group_means(model: TPDiffModule, root: Path, limit: int, groupings: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Per grouping, the mean latent clip of each group over up to ``limit`` training clips."""
    sums: dict[str, dict[str, torch.Tensor]] = {g: {} for g in groupings}
    counts: dict[str, dict[str, int]] = {g: defaultdict(int) for g in groupings}
    for captions, x0 in clips(model, root, "train", limit):
        for caption, clip in zip(captions, x0.double()):
            for g in groupings:
                key = group_key(caption, g)
                sums[g][key] = sums[g][key] + clip if key in sums[g] else clip.clone()
                counts[g][key] += 1
    return {g: {k: (s / counts[g][k]).float() for k, s in sums[g].items()} for g in groupings}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data-root", type=Path, default=ROOT / "data" / "synthetic")
    parser.add_argument("--train-clips", type=int, default=2048, help="training clips the group means are taken over")
    parser.add_argument("--clips", type=int, default=64, help="eval clips scored")
    parser.add_argument("--draws", type=int, default=4, help="noise draws per eval clip")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "noisy_end_probe.json"))
    args = parser.parse_args(argv)
    if args.train_clips < 1 or args.clips < 1 or args.draws < 1:
        parser.error(f"--train-clips {args.train_clips} --clips {args.clips} --draws {args.draws}: expected each >= 1")
    info = machine_info()
    model = TPDiffModule.load_from_checkpoint(args.checkpoint, map_location="cpu").eval()
    pyramid = model.pyramid
    if pyramid.schedule.name != "flow" or pyramid.stages[0].t_start != 1.0:
        raise SystemExit(f"{args.checkpoint}: expected a flow checkpoint whose first stage starts at t = 1 (pure "
                         f"noise); it has schedule {pyramid.schedule.name!r}")
    groupings = ["all", *FACTORS, "caption"]
    rows = []
    with torch.no_grad(), model.ema_weights():
        means = group_means(model, args.data_root, args.train_clips, groupings)
        batches = list(clips(model, args.data_root, "eval", args.clips))
        captions, x0 = [c for b in batches for c in b[0]], torch.cat([b[1] for b in batches])
        variants = {"model": captions, "model, direction swapped": [swapped(c, SWAPS["direction"]) for c in captions]}
        encoded = {name: model.text_encoder(texts) for name, texts in variants.items()}
        losses: dict[str, list[float]] = defaultdict(list)
        stage = pyramid.stages[0]
        u = torch.ones(len(captions))
        for draw in range(args.draws):
            noise = torch.randn(pyramid.stage_shape(x0, 0), generator=torch.Generator().manual_seed(draw))
            x_t, t, target = pyramid.interpolate(x0, noise, 0, u)
            for name, (text, mask) in encoded.items():
                pred = model.run_backbone(model.backbone, x_t, model.model_time(t), text, mask, stage)
                losses[name].append(float(((pred.float() - target.float()) ** 2).mean()))
            for g in groupings:  # the target with each clip replaced by its group's mean: the group's best guess
                guess = torch.stack([means[g].get(group_key(c, g), means["all"][""]) for c in captions])  # no group
                # in the training clips read (a short --train-clips): the mean of all
                losses[g].append(float(((pyramid.interpolate(guess, noise, 0, u)[2] - target) ** 2).mean()))
    labels = {"model": "model, true caption", "model, direction swapped": "model, direction word swapped",
              "all": "mean of all training clips", **{f: f"mean by {f}" for f in FACTORS},
              "caption": "mean by whole caption"}
    loss = {k: sum(v) / len(v) for k, v in losses.items()}
    for key, label in labels.items():
        rows.append({"predictor": label, "loss": loss[key], "vs_mean_of_all": loss[key] / loss["all"] - 1})
    table = print_table(["predictor at t = 1 (stage 0, pure-noise input)", "loss", "vs mean of all clips"],
                        [[r["predictor"], f"{r['loss']:.5f}", f"{r['vs_mean_of_all']:+.1%}"] for r in rows])
    result = {"bench": "noisy_end_probe", "checkpoint": str(args.checkpoint),
              "step": torch.load(args.checkpoint, map_location="cpu", weights_only=False).get("global_step"),
              "train_clips": args.train_clips, "clips": len(captions), "draws": args.draws,
              "groups": {g: len(means[g]) for g in groupings},
              "eval_clips_without_a_group": {g: sum(group_key(c, g) not in means[g] for c in captions) for g in groupings},
              "rows": rows, "table": table,
              "machine": finish_machine_info(info)}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
