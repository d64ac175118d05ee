"""How much of the synthetic clips' pixel variance each caption factor explains: the most a caption word can lower
the loss where the noisy clip shows nothing (pure noise), per factor.

    python bench/caption_variance.py                    # 1024 training clips of the default dataset (16 x 32 x 32)
    python bench/caption_variance.py --clips 4096 --frame-step 4     # every 4th frame: the lowest-rate stage

For each factor (colour, direction, shape, speed) the share is ``sum_v p(v) ||E[x | v] - E[x]||^2 / sum Var(x)``
over the clips' pixels in [-1, 1]: the fraction of the variance that knowing the word removes. A word with a large
share that a trained model still ignores (``bench/caption_probe.py``) is not ignored for lack of signal. Prints a
table and writes JSON.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from common import ROOT, finish_machine_info, machine_info, print_table, write_json
from tpdiff_lightning.data.synthetic import clip_rng, make_clip

FACTORS = ("colour", "direction", "shape", "speed")


def explained_shares(clips: np.ndarray, labels: dict[str, list[str]]) -> dict[str, float]:
    """Share of the total pixel variance of ``clips (N, ...)`` explained by each factor's per-value means."""
    mean = clips.mean(axis=0)
    total = float(((clips - mean) ** 2).mean(axis=0).sum())
    shares = {}
    for factor, values in labels.items():
        values = np.asarray(values)
        between = 0.0
        for value in np.unique(values):
            group = clips[values == value]
            between += len(group) / len(clips) * float(((group.mean(axis=0) - mean) ** 2).sum())
        shares[factor] = between / total
    return shares


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=1024)
    parser.add_argument("--num-frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--frame-step", type=int, default=1, help="keep every n-th frame (a stage's frame rate)")
    parser.add_argument("--seed", type=int, default=0, help="the dataset's seed (its training split is read)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "caption_variance.json"))
    args = parser.parse_args(argv)
    if args.clips < 2 or args.frame_step < 1 or args.num_frames < 1:
        parser.error(f"--clips {args.clips} --frame-step {args.frame_step} --num-frames {args.num_frames}: expected "
                     "at least 2 clips, a frame step >= 1 and at least 1 frame")
    info = machine_info()
    clips, labels = [], {f: [] for f in FACTORS}
    for index in range(args.clips):
        frames, _, meta = make_clip(clip_rng(args.seed, "train", index), args.num_frames, args.size)
        clips.append(frames[:: args.frame_step].astype(np.float32) / 127.5 - 1.0)
        for f in FACTORS:
            labels[f].append(meta[f])
    shares = explained_shares(np.stack(clips), labels)
    table = print_table(["factor", "share of pixel variance explained"], [[f, f"{shares[f]:.2%}"] for f in FACTORS])
    result = {"bench": "caption_variance", "clips": args.clips, "num_frames": args.num_frames, "size": args.size,
              "frame_step": args.frame_step, "shares": shares, "table": table, "machine": finish_machine_info(info)}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
