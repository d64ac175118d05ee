"""Samples of trained checkpoints side by side: a contact sheet, and how often each clip shows its caption.

    python bench/equal_compute_samples.py \
        --checkpoint vanilla=outputs/contact/vanilla-flow-s0/checkpoints/last.ckpt \
        --checkpoint temporal=outputs/contact/tpdiff-flow-s0/checkpoints/last.ckpt \
        --checkpoint spatio-temporal=outputs/contact/tpdiff-flow-spatiotemporal-s0/checkpoints/last.ckpt

Every checkpoint samples the same captions with the same seeds (its EMA weights, its own ``sample_steps``
unless ``--steps``, its own guidance scale unless ``--guidance``). The sheet has one block per caption, one row
per checkpoint, frames left to right. Each clip is also checked against its caption by ``tpdiff_lightning.data.caption_accuracy.clip_report`` (the shape's colour and
its direction of motion), a second, coarser quality measure beside FVD. The checkpoints' steps and, where the
convergence study's ``TrainingBudget`` counted them, backbone training TFLOPs go in the table, so the sheet can
be read at equal compute. Prints a table, writes the PNG and ``bench/results/equal_compute_samples.json``.
"""

from __future__ import annotations

import argparse
import itertools
import random
from typing import Any

import torch

from common import ROOT, finish_machine_info, machine_info, print_table, write_json
from tpdiff_lightning.callbacks.visualize import save_contact_sheet
from tpdiff_lightning.data.caption_accuracy import clip_report
from tpdiff_lightning.data.synthetic import DIRECTIONS, PALETTE, SHAPES, SPEEDS, caption_for
from tpdiff_lightning.training.module import TPDiffModule, to_uint8_video


def captions(count: int) -> list[tuple[str, str, str]]:
    """``count`` distinct (caption, colour, direction) triples: every colour x direction x shape x speed
    combination once, in a fixed shuffled order (cycling when ``count`` is larger)."""
    combos = list(itertools.product(PALETTE, DIRECTIONS, SHAPES, SPEEDS))
    random.Random(0).shuffle(combos)
    return [(caption_for(colour, shape, direction, speed), colour, direction)
            for colour, direction, shape, speed in itertools.islice(itertools.cycle(combos), count)]


def trained_flops(checkpoint: dict[str, Any]) -> float | None:
    """Backbone training TFLOPs the convergence study's budget callback counted; ``None`` where it did not count
    them (no such callback, or a budget in minutes)."""
    state = (checkpoint.get("callbacks") or {}).get("TrainingBudget")
    if not state:
        return None
    counted = state["tflops"] is not None if "tflops" in state else state["flops"] > 0  # older states lack the mode
    return state["flops"] / 1e12 if counted else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", required=True, metavar="NAME=PATH",
                        help="a trained checkpoint and its row label (repeatable)")
    parser.add_argument("--captions", type=int, default=24, help="captions sampled, one clip each")
    parser.add_argument("--sheet-captions", type=int, default=6, help="captions shown on the contact sheet")
    parser.add_argument("--seed", type=int, default=0, help="clip i is drawn with seed + i")
    parser.add_argument("--seeds-per-caption", type=int, default=1,
                        help="clips per caption, drawn with seeds seed .. seed + N - 1 (the issue's check: "
                             "--captions 8 --seeds-per-caption 4); 1: one clip per caption, clip i with seed + i")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: each model's own)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default: each model's own)")
    parser.add_argument("--png", default=str(ROOT / "docs" / "equal_compute_samples.png"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "equal_compute_samples.json"))
    args = parser.parse_args(argv)
    pairs = [c.partition("=") for c in args.checkpoint]
    bad = [c for c, (name, eq, path) in zip(args.checkpoint, pairs) if not (name and eq and path)]
    if bad:
        parser.error(f"--checkpoint {bad[0]!r}: expected NAME=PATH")
    if args.captions < 1 or not 0 < args.sheet_captions <= args.captions:
        parser.error(f"--captions {args.captions} --sheet-captions {args.sheet_captions}: expected "
                     "1 <= sheet captions <= captions")
    if args.seeds_per_caption < 1:
        parser.error(f"--seeds-per-caption {args.seeds_per_caption}: expected at least 1")
    if args.guidance is not None and args.guidance < 0:
        parser.error(f"--guidance {args.guidance}: expected a scale >= 0 (1: no guidance, 0: unconditional)")
    torch.manual_seed(0)
    n = args.seeds_per_caption
    prompts = [p for p in captions(args.captions) for _ in range(n)]
    seeds = [args.seed + i for i in range(args.captions)] if n == 1 else \
        [args.seed + s for _ in range(args.captions) for s in range(n)]
    info = machine_info()
    rows, results, videos = [], {}, {}
    for name, _, path in pairs:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        model = TPDiffModule.load_from_checkpoint(path, map_location="cpu").eval()
        with torch.no_grad():
            clips = to_uint8_video(model.generate([p for p, _, _ in prompts], seeds, num_steps=args.steps,
                                                  guidance_scale=args.guidance)).numpy()
        reports = [clip_report(clip, colour, direction) for clip, (_, colour, direction) in zip(clips, prompts)]
        colour = sum(r["colour_ok"] for r in reports) / len(reports)
        direction = sum(r["direction_ok"] for r in reports) / len(reports)
        both = sum(r["colour_ok"] and r["direction_ok"] for r in reports) / len(reports)
        tflops = trained_flops(checkpoint)
        results[name] = {"checkpoint": str(path), "step": checkpoint.get("global_step"), "train_tflops": tflops,
                         "guidance_scale": model.settings.sampling.guidance_scale if args.guidance is None
                         else args.guidance,
                         "colour_ok": colour, "direction_ok": direction, "both_ok": both, "clips": reports}
        videos[name] = clips
        rows.append([name, checkpoint.get("global_step"), "-" if tflops is None else f"{tflops:.1f}",
                     f"{results[name]['guidance_scale']:g}",
                     f"{colour:.0%}", f"{direction:.0%}", f"{both:.0%}"])
    print(f"{args.captions} captions, {n} clip(s) each, seeds {min(seeds)}..{max(seeds)}")
    table = print_table(["checkpoint", "step", "train TFLOPs", "guidance", "colour right", "direction right", "both"], rows)
    sheet, labels = [], []
    for i in range(args.sheet_captions):
        for name in videos:
            sheet.append(videos[name][i * n])
            labels.append(f"{name}: {prompts[i * n][0]}")
    png = save_contact_sheet(args.png, sheet, labels)
    print(f"wrote {png}")
    result = {"bench": "equal_compute_samples", "captions": [p for p, _, _ in prompts], "seeds": seeds,
              "results": results, "table": table, "machine": finish_machine_info(info)}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
