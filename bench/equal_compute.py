"""FVD and caption accuracy of several convergence runs at equal training compute, averaged over their seeds.

    python bench/convergence.py --runs tpdiff-flow-spatiotemporal --seeds 0,1 --budget-tflops 13
    python bench/equal_compute.py --runs vanilla-flow,tpdiff-flow,tpdiff-flow-spatiotemporal --seeds 0,1
    python bench/equal_compute.py --runs vanilla-flow-motion,tpdiff-flow-motion,tpdiff-flow-spatiotemporal-motion \
        --seeds 0 --convergence bench/results/convergence_motion.json --out bench/results/equal_compute_motion.json \
        --plot docs/equal_compute_motion.png

Each run's FVD curve (``bench/results/convergence.json``) is read piecewise linearly at the same backbone
training FLOPs, on a grid over the span every chosen curve covers, then averaged over the seeds; so are the
colour and direction accuracy of the same generated clips where every chosen run logged them. Prints a table
(one column per run and measure), writes ``bench/results/equal_compute.json`` and, with ``--plot``, a PNG of
each measure against TFLOPs.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from convergence import CAPTION_FACTORS, interpolate

from common import ROOT, line_plot, print_table, write_json


def equal_compute(runs: list[dict[str, Any]], names: list[str], seeds: list[int], num: int) -> dict[str, Any]:
    """Mean FVD of each run in ``names`` over ``seeds`` at ``num`` FLOP values every curve covers, and the mean
    caption accuracies (``mean_colour_accuracy``, ``mean_direction_accuracy``) where every curve logged them."""
    by_key = {(r["run"], r["seed"]): r["points"] for r in runs}
    missing = [f"{n} seed {s}" for n in names for s in seeds if (n, s) not in by_key]
    if missing:
        raise SystemExit(f"the convergence JSON lacks {', '.join(missing)}; run bench/convergence.py for them first")
    curves = [by_key[(n, s)] for n in names for s in seeds]
    lo = max(c[0]["train_flops"] for c in curves)
    hi = min(c[-1]["train_flops"] for c in curves)
    if hi <= lo:
        raise SystemExit("the chosen curves share no span of training FLOPs")
    grid = [lo + (hi - lo) * k / (num - 1) for k in range(num)]

    def seed_mean(key: str) -> dict[str, list[float]]:
        return {n: [statistics.mean(v) for v in zip(*(interpolate(by_key[(n, s)], grid, key) for s in seeds))]
                for n in names}

    result = {"runs": names, "seeds": seeds, "train_tflops": [g / 1e12 for g in grid], "mean_fvd": seed_mean("fvd")}
    for factor in CAPTION_FACTORS:  # only where every point of every chosen curve has it
        if all(factor in p for c in curves for p in c):
            result[f"mean_{factor}"] = seed_mean(factor)
    return result


def first_crossing(points: list[dict[str, float]], key: str, level: float) -> float | None:
    """Training FLOPs at which ``key`` first reaches ``level``, linear between the two evaluations that straddle
    it; ``None`` if it never does."""
    for before, after in zip([None, *points], points):
        if after[key] >= level:
            if before is None:
                return after["train_flops"]
            share = (level - before[key]) / (after[key] - before[key])
            return before["train_flops"] + share * (after["train_flops"] - before["train_flops"])
    return None


def direction_reach(runs: list[dict[str, Any]], names: list[str], seeds: list[int], levels: list[float]
                    ) -> dict[str, dict[str, list[float | None]]]:
    """Per run and level: the TFLOPs at which each seed's direction accuracy first reached it (None: never)."""
    by_key = {(r["run"], r["seed"]): r["points"] for r in runs}
    return {n: {f"{level:g}": [None if (x := first_crossing(by_key[(n, s)], "direction_accuracy", level)) is None
                               else x / 1e12 for s in seeds] for level in levels} for n in names}


def plot(result: dict[str, Any], path: str) -> None:
    """FVD and each caption accuracy against training TFLOPs, one panel per measure, the runs overlaid."""
    seeds = ", ".join(map(str, result["seeds"]))
    panels = {f"{'FVD' if key == 'mean_fvd' else key.removeprefix('mean_').replace('_', ' ')} (mean of seeds {seeds})":
              {n: (result["train_tflops"], result[key][n]) for n in result["runs"]}
              for key in ["mean_fvd", *(f"mean_{f}" for f in CAPTION_FACTORS)] if key in result}
    print(f"wrote {line_plot(path, panels, 'backbone training TFLOPs', 'FVD | accuracy')}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="vanilla-flow,tpdiff-flow,tpdiff-flow-spatiotemporal")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--points", type=int, default=6, help="FLOP values on the shared span")
    parser.add_argument("--convergence", default=str(ROOT / "bench" / "results" / "convergence.json"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "equal_compute.json"))
    parser.add_argument("--plot", default="", help="a PNG of each measure against TFLOPs (none if empty)")
    parser.add_argument("--reach", default="0.5,0.8",
                        help="direction accuracies whose first crossing (TFLOPs) is reported per run and seed")
    args = parser.parse_args(argv)
    if args.points < 2:
        parser.error(f"--points {args.points}: expected at least 2")
    names, seeds = args.runs.split(","), [int(s) for s in args.seeds.split(",")]
    runs = json.loads(Path(args.convergence).read_text())["runs"]
    result = {"bench": "equal_compute", **equal_compute(runs, names, seeds, args.points)}
    factors = [f for f in CAPTION_FACTORS if f"mean_{f}" in result]
    words = [f.removesuffix("_accuracy") for f in factors]  # colour, direction
    measures = ", ".join(["FVD", *words]) + (" accuracy" if words else "")
    print(f"mean {measures} over seeds {seeds} at equal backbone training compute")
    header = ["TFLOPs", *(f"{n} {m}" for n in names for m in ["FVD", *words])]
    rows = [[f"{x:.1f}", *(cell for n in names for cell in
                           [f"{result['mean_fvd'][n][k]:.0f}", *(f"{result[f'mean_{f}'][n][k]:.0%}" for f in factors)])]
            for k, x in enumerate(result["train_tflops"])]
    result["table"] = print_table(header, rows)
    if "mean_direction_accuracy" in result:
        levels = [float(x) for x in args.reach.split(",") if x]
        result["direction_reach_tflops"] = direction_reach(runs, names, seeds, levels)
        for level in levels:
            print(f"TFLOPs at which direction accuracy first reached {level:.0%}, seeds {seeds}: " + "; ".join(
                f"{n} " + ", ".join("never" if x is None else f"{x:.1f}"
                                    for x in result["direction_reach_tflops"][n][f"{level:g}"]) for n in names))
    write_json(args.out, result)
    if args.plot:
        plot(result, args.plot)
    return result


if __name__ == "__main__":
    main()
