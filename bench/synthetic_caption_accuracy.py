"""How often generated synthetic clips show the captioned colour and direction of motion.

    python bench/synthetic_caption_accuracy.py outputs/synthetic/tpdiff-flow/predictions

Reads the mp4 files that ``predict`` wrote (their names hold the caption), finds the shape by its
distance from the background colour, fits its centroid's velocity, and compares with the caption.
Prints one line per clip and the totals, and writes JSON next to the clips.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from tpdiff_lightning.data.synthetic import BACKGROUND, DIRECTIONS, PALETTE
from tpdiff_lightning.data.video_io import decode_mp4


def clip_report(frames: np.ndarray, colour: str, direction: str) -> dict:
    """Colour and direction check of one uint8 clip ``(F, H, W, 3)``."""
    video = frames.astype(np.int64)
    mask = np.abs(video - np.asarray(BACKGROUND)).sum(-1) > 90  # (F, H, W)
    ys, xs = np.mgrid[: video.shape[1], : video.shape[2]]
    area = np.maximum(mask.sum((1, 2)), 1)
    centroid = np.stack([(xs * mask).sum((1, 2)) / area, (ys * mask).sum((1, 2)) / area], 1)  # (F, 2)
    velocity = np.polyfit(np.arange(len(centroid)), centroid, 1)[0]  # (vx, vy) in px/frame
    mean_rgb = video[mask].mean(0) if mask.any() else np.asarray(BACKGROUND, float)
    nearest = min(PALETTE, key=lambda k: np.abs(np.asarray(PALETTE[k]) - mean_rgb).sum())
    # The captioned axis must carry most of the motion, in the captioned sense.
    along = float(velocity @ np.asarray(DIRECTIONS[direction], float))
    direction_ok = along > 0.1 and along > np.abs(velocity).max() - 1e-9
    return {"colour": nearest, "colour_ok": nearest == colour, "velocity": velocity.round(3).tolist(),
            "direction_ok": bool(direction_ok)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    rows = []
    for path in sorted(args.folder.glob("*.mp4")):
        words = path.stem.split("_")  # <index>_a_<colour>_<shape>_moving_<direction>_<speed>_seed<s>_rank<r>
        colour, direction = words[2], words[5]
        report = clip_report(decode_mp4(path.read_bytes()), colour, direction)
        rows.append({"file": path.name, "caption_colour": colour, "caption_direction": direction, **report})
        print(f"{path.name[:60]:60s} colour {'ok' if report['colour_ok'] else 'NO'}  "
              f"direction {'ok' if report['direction_ok'] else 'NO'}  v={report['velocity']}")
    if not rows:
        raise SystemExit(f"no mp4 files in {args.folder}")
    summary = {"clips": len(rows), "colour_accuracy": sum(r["colour_ok"] for r in rows) / len(rows),
               "direction_accuracy": sum(r["direction_ok"] for r in rows) / len(rows),
               "direction_chance": 0.25}
    print(json.dumps(summary))
    (args.folder / "caption_accuracy.json").write_text(json.dumps({"summary": summary, "clips": rows}, indent=2))


if __name__ == "__main__":
    main()
