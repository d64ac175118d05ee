"""Does a checkpoint use each word of its caption? The training loss on real eval clips with the true caption against
the same caption with one factor swapped (colour, direction, shape, speed) or with no caption, per stage, at the
same noise and times.

    python bench/caption_probe.py outputs/synthetic/tpdiff-flow/checkpoints/last.ckpt
    python bench/caption_probe.py CKPT --paths     # also: through which path (cross-attention or pooled) each word acts

A model that has learnt a factor predicts confidently from it, so swapping it for a wrong one raises the loss; a
gap near 0 means the word is ignored. Sampling can miss a factor for other reasons (guidance, too few steps); this
asks the denoiser directly. EMA weights, 64 eval clips, 4 noise draws per stage. Prints a table and writes JSON.

``--paths`` (the built-in DiT, which reads the caption twice: its tokens through cross-attention, and their mean
through the adaLN conditioning) swaps each factor in one path only, the other reading the true caption, so each
gap splits into what cross-attention and the pooled caption make of the word.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from common import ROOT, eval_split_urls, finish_machine_info, machine_info, model_clips, print_table, write_json
from tpdiff_lightning.training.module import TPDiffModule

SWAPS = {
    "colour": {"red": "blue", "blue": "red", "green": "yellow", "yellow": "green"},
    "direction": {"left": "right", "right": "left", "up": "down", "down": "up"},
    "shape": {"circle": "square", "square": "circle"},
    "speed": {"slow": "fast", "fast": "slow"},
}


def swapped(caption: str, table: dict[str, str]) -> str:
    return " ".join(table.get(word, word) for word in caption.split())


@contextmanager
def pooled_caption(backbone: Any, text: torch.Tensor, mask: torch.Tensor):
    """Inside, the backbone's pooled-caption path reads ``(text, mask)`` whatever caption the backbone is given."""
    pool = getattr(backbone, "caption_pool", None)
    if pool is None:
        raise SystemExit(f"--paths needs a backbone with a pooled-caption path (the built-in DiT with "
                         f"caption_pooling: true); {type(backbone).__name__} has none")
    original = pool.forward
    pool.forward = lambda *_: original(text, mask)
    try:
        yield
    finally:
        del pool.forward  # the class's forward again


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data-root", type=Path, default=ROOT / "data" / "synthetic")
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--draws", type=int, default=4, help="noise draws per stage")
    parser.add_argument("--paths", action="store_true", help="also split each gap into cross-attention and pooled")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "caption_probe.json"))
    args = parser.parse_args(argv)
    urls = eval_split_urls(parser, args.data_root)
    info = machine_info()
    model = TPDiffModule.load_from_checkpoint(args.checkpoint, map_location="cpu").eval()
    captions, videos = map(list, zip(*model_clips(model, urls, args.clips)))
    video = torch.stack(videos)
    variants = {"true": captions, **{f"{k} swapped": [swapped(c, t) for c in captions] for k, t in SWAPS.items()},
                "no caption": [""] * len(captions)}
    rows = []
    with torch.no_grad(), model.ema_weights():
        x0 = model.batch_latents({"video": video, "caption": captions})
        encoded = {name: model.text_encoder(texts) for name, texts in variants.items()}
        for i in range(len(model.pyramid.stages)):
            def loss(text: torch.Tensor, mask: torch.Tensor) -> float:
                draws = [float(model.stage_loss(x0, text, mask, i, torch.Generator().manual_seed(d)))
                         for d in range(args.draws)]
                return sum(draws) / len(draws)

            losses = {name: loss(*encoded[name]) for name in variants}
            row = {"stage": i, "loss": losses,
                   "gap": {k: v / losses["true"] - 1 for k, v in losses.items() if k != "true"}}
            if args.paths:  # one path reads the swapped caption, the other the true one
                row["paths"] = {}
                for factor in SWAPS:
                    swap = encoded[f"{factor} swapped"]
                    with pooled_caption(model.backbone, *encoded["true"]):
                        cross = loss(*swap)
                    with pooled_caption(model.backbone, *swap):
                        pooled = loss(*encoded["true"])
                    row["paths"][factor] = {"cross_attention": cross / losses["true"] - 1,
                                            "pooled": pooled / losses["true"] - 1}
            rows.append(row)
    names = [k for k in variants if k != "true"]
    table = print_table(["stage", "loss, true caption", *(f"{n} gap" for n in names)],
                        [[r["stage"], f"{r['loss']['true']:.5f}", *(f"{r['gap'][n]:+.1%}" for n in names)]
                         for r in rows])
    if args.paths:
        table += "\n" + print_table(["stage", *(f"{f} via cross-attention / pooled" for f in SWAPS)],
                                    [[r["stage"], *(f"{r['paths'][f]['cross_attention']:+.1%} / "
                                                    f"{r['paths'][f]['pooled']:+.1%}" for f in SWAPS)]
                                     for r in rows])
    result = {"bench": "caption_probe", "checkpoint": str(args.checkpoint), "step": torch.load(
        args.checkpoint, map_location="cpu", weights_only=False).get("global_step"), "clips": len(captions),
        "stages": rows, "table": table, "machine": finish_machine_info(info)}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
