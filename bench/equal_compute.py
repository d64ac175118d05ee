"""FVD of several convergence runs at equal training compute, averaged over the seeds they share.

    python bench/convergence.py --runs tpdiff-flow-spatiotemporal --seeds 0,1 --budget-tflops 13
    python bench/equal_compute.py --runs vanilla-flow,tpdiff-flow,tpdiff-flow-spatiotemporal --seeds 0,1

Each run's FVD curve (``bench/results/convergence.json``) is read piecewise linearly at the same backbone
training FLOPs, on a grid over the span every chosen curve covers, then averaged over the seeds. Prints a table
(one column per run) and writes ``bench/results/equal_compute.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from convergence import interpolate

from common import ROOT, print_table, write_json


def equal_compute(runs: list[dict[str, Any]], names: list[str], seeds: list[int], num: int) -> dict[str, Any]:
    """Mean FVD of each run in ``names`` over ``seeds`` at ``num`` FLOP values every curve covers."""
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
    mean = {n: [statistics.mean(v) for v in zip(*(interpolate(by_key[(n, s)], grid) for s in seeds))] for n in names}
    return {"runs": names, "seeds": seeds, "train_tflops": [g / 1e12 for g in grid], "mean_fvd": mean}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="vanilla-flow,tpdiff-flow,tpdiff-flow-spatiotemporal")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--points", type=int, default=6, help="FLOP values on the shared span")
    parser.add_argument("--convergence", default=str(ROOT / "bench" / "results" / "convergence.json"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "equal_compute.json"))
    args = parser.parse_args(argv)
    if args.points < 2:
        parser.error(f"--points {args.points}: expected at least 2")
    names, seeds = args.runs.split(","), [int(s) for s in args.seeds.split(",")]
    result = {"bench": "equal_compute",
              **equal_compute(json.loads(Path(args.convergence).read_text())["runs"], names, seeds, args.points)}
    print(f"mean FVD over seeds {seeds} at equal backbone training compute")
    result["table"] = print_table(["TFLOPs", *names], [[f"{x:.1f}", *(f"{result['mean_fvd'][n][k]:.0f}" for n in names)]
                                                      for k, x in enumerate(result["train_tflops"])])
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
