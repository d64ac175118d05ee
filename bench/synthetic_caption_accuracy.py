"""How often generated synthetic clips show the captioned colour and direction of motion.

    python bench/synthetic_caption_accuracy.py outputs/synthetic/tpdiff-flow/predictions

Reads the mp4 files that ``predict`` wrote (their names hold the caption) and checks each against its caption
with ``tpdiff_lightning.data.caption_accuracy`` (the shape's colour and its centroid's direction of motion).
Prints one line per clip and the totals, and writes JSON next to the clips.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tpdiff_lightning.data.video_io import decode_mp4
from tpdiff_lightning.data.caption_accuracy import DIRECTION_CHANCE, clip_report


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
               "direction_chance": DIRECTION_CHANCE}
    print(json.dumps(summary))
    (args.folder / "caption_accuracy.json").write_text(json.dumps({"summary": summary, "clips": rows}, indent=2))


if __name__ == "__main__":
    main()
