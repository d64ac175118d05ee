"""Which colour word does a checkpoint read from each caption, and which colour does it draw?

    python bench/colour_confusion.py outputs/synthetic/tpdiff-flow-motion/checkpoints/last.ckpt \
        --data-root data/synthetic_centred

Two views, per (colour, direction) of the synthetic captions (square, fast):
- **Loss.** The stage-0 training loss on eval clips of that colour and direction, with each of the four colour words
  in their captions (same noise and times, EMA weights). A model that reads the colour word has its lowest loss at
  the clip's own colour, far below the others; a wrong word within ``--margin`` of the right one is a confusion.
- **Samples.** The colour the caption classifier sees in clips generated for that caption (``--seeds`` seeds),
  and for the same caption with one stray letter appended (``--stray``, default ``d``): a model that keys a colour
  word on one of its letters changes colour when that letter turns up elsewhere in the caption.

A byte-level encoder trained from scratch confused "red" with any caption holding the byte ``d``: docs/benchmarks.md
§14. Prints two tables and writes JSON.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from common import ROOT, eval_split_urls, finish_machine_info, machine_info, model_clips, print_table, write_json
from tpdiff_lightning.data.caption_accuracy import caption_accuracy, caption_factors
from tpdiff_lightning.data.synthetic import DIRECTIONS, PALETTE, caption_for
from tpdiff_lightning.training.module import TPDiffModule, to_uint8_video

COLOURS = tuple(PALETTE)


def recolour(caption: str, colour: str) -> str:
    """The caption with its colour word replaced by ``colour``."""
    return re.sub(r"\b(" + "|".join(COLOURS) + r")\b", colour, caption, count=1)


def loss_table(model: TPDiffModule, clips: dict[tuple[str, str], list[tuple[str, torch.Tensor]]],
               draws: int) -> dict[str, dict[str, dict[str, float]]]:
    """``{direction: {clip colour: {caption colour: stage-0 loss}}}`` over the clips of each colour and direction."""
    table: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for (colour, direction), group in sorted(clips.items()):
        captions = [c for c, _ in group]
        x0 = model.batch_latents({"video": torch.stack([v for _, v in group]), "caption": captions})
        table[direction][colour] = {}
        for word in COLOURS:
            text, mask = model.text_encoder([recolour(c, word) for c in captions])
            losses = [float(model.stage_loss(x0, text, mask, 0, torch.Generator().manual_seed(d)))
                      for d in range(draws)]
            table[direction][colour][word] = sum(losses) / draws
    return dict(table)


def confusions(table: dict[str, dict[str, dict[str, float]]], margin: float) -> list[dict[str, Any]]:
    """Each (direction, clip colour, wrong word) whose loss is within ``margin`` (relative) of the right word's."""
    found = []
    for direction, rows in table.items():
        for colour, losses in rows.items():
            for word, loss in losses.items():
                if word != colour and loss <= losses[colour] * (1 + margin):
                    found.append({"direction": direction, "clip colour": colour, "caption colour": word,
                                  "loss ratio": loss / losses[colour]})
    return found


def drawn_colours(model: TPDiffModule, captions: list[str], seeds: int, steps: int) -> dict[str, list[str]]:
    """The colour the classifier sees in each generated clip, per caption."""
    every = [c for c in captions for _ in range(seeds)]
    video = model.generate(every, [s for _ in captions for s in range(seeds)], num_steps=steps)
    reports = caption_accuracy(list(to_uint8_video(video).numpy()), every)["reports"]
    drawn: dict[str, list[str]] = defaultdict(list)
    for caption, report in zip(every, reports):
        drawn[caption].append(report["colour"])
    return dict(drawn)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data-root", type=Path, default=ROOT / "data" / "synthetic")
    parser.add_argument("--draws", type=int, default=3, help="noise draws per loss")
    parser.add_argument("--seeds", type=int, default=2, help="generated clips per caption")
    parser.add_argument("--steps", type=int, default=30, help="sampling steps")
    parser.add_argument("--stray", default="d", help="the letter appended to each caption in the stray-letter row")
    parser.add_argument("--margin", type=float, default=0.1, help="a wrong word this close (relative) is a confusion")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "colour_confusion.json"))
    args = parser.parse_args(argv)
    urls = eval_split_urls(parser, args.data_root)
    info = machine_info()
    model = TPDiffModule.load_from_checkpoint(args.checkpoint, map_location="cpu").eval()
    clips: dict[tuple[str, str], list[tuple[str, torch.Tensor]]] = defaultdict(list)
    for caption, video in model_clips(model, urls):
        clips[caption_factors(caption)].append((caption, video))
    captions = [caption_for(c, "square", d, "fast") for d in DIRECTIONS for c in COLOURS]
    stray = {c: f"{c} {args.stray}" for c in captions}
    with torch.no_grad(), model.ema_weights():
        losses = loss_table(model, clips, args.draws)
        drawn = drawn_colours(model, captions + list(stray.values()), args.seeds, args.steps)
    found = confusions(losses, args.margin)
    table = print_table(["direction", "clip colour", *(f"loss, '{w}' caption" for w in COLOURS)],
                        [[d, c, *(f"{losses[d][c][w]:.4f}" for w in COLOURS)]
                         for d in losses for c in losses[d]])
    table += "\n" + print_table(["caption", "drawn", f"drawn, with ' {args.stray}' appended"],
                                [[c, " ".join(drawn[c]), " ".join(drawn[stray[c]])] for c in captions])
    result = {"bench": "colour_confusion", "checkpoint": str(args.checkpoint), "margin": args.margin,
              "data_root": str(args.data_root), "draws": args.draws, "seeds": args.seeds, "steps": args.steps,
              "loss": losses, "confusions": found, "drawn": {c: drawn[c] for c in captions},
              "drawn_with_stray_letter": {c: drawn[stray[c]] for c in captions}, "stray": args.stray,
              "table": table, "machine": finish_machine_info(info)}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
