"""From scratch, which flow target: stage-time or global-time velocity? FVD at equal compute, seed by seed.

    python bench/convergence.py --runs tpdiff-flow-global --seeds 0,1 --budget-tflops 13   # the global runs
    python bench/flow_velocity_study.py                                                   # this comparison

Both runs are the default config (``tpdiff-flow``: ``flow_velocity: stage``; ``tpdiff-flow-global``:
``configs/flow_velocity_global.yaml``) with the same seeds. The stage drawn at each step is a function of the step
and the seed only, so at the same step both runs have spent exactly the same backbone FLOPs: their FVD points are
compared step by step, over the steps both reached. Reads ``bench/results/convergence.json``, prints a table and
writes ``bench/results/flow_velocity_study.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from common import ROOT, print_table, write_json

RUNS = ("tpdiff-flow", "tpdiff-flow-global")


def compare(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per step both runs reached in every shared seed: the FVD of each and the difference (global − stage)."""
    by = {(r["run"], r["seed"]): {p["step"]: p for p in r["points"]} for r in runs if r["run"] in RUNS}
    seeds = sorted(seed for (run, seed) in by if run == RUNS[1] and (RUNS[0], seed) in by)
    if not seeds:
        raise SystemExit(f"no seed has both {RUNS[0]} and {RUNS[1]} in the convergence JSON; run "
                         f"`python bench/convergence.py --runs {RUNS[1]} --seeds 0,1 --budget-tflops 13` first")
    steps = sorted(set.intersection(*(set(by[(run, s)]) for run in RUNS for s in seeds)))
    rows = []
    for step in steps:
        stage = [by[(RUNS[0], s)][step]["fvd"] for s in seeds]
        glob = [by[(RUNS[1], s)][step]["fvd"] for s in seeds]
        diffs = [g - t for g, t in zip(glob, stage)]
        sem = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
        flops = [by[(RUNS[0], s)][step]["train_flops"] for s in seeds]
        rows.append({"step": step, "train_tflops": statistics.mean(flops) / 1e12,
                     "flops_equal": all(abs(by[(RUNS[1], s)][step]["train_flops"] - f) <= 1e-6 * f
                                        for s, f in zip(seeds, flops)),
                     "fvd_stage": stage, "fvd_global": glob, "mean_stage": statistics.mean(stage),
                     "mean_global": statistics.mean(glob), "mean_diff": statistics.mean(diffs), "sem_diff": sem})
    return {"seeds": seeds, "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--convergence", default=str(ROOT / "bench" / "results" / "convergence.json"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "flow_velocity_study.json"))
    args = parser.parse_args(argv)
    result = {"bench": "flow_velocity_study", **compare(json.loads(Path(args.convergence).read_text())["runs"])}
    print(f"FVD at equal compute, seeds {result['seeds']} (global − stage: negative favours global)")
    result["table"] = print_table(
        ["step", "TFLOPs", "FVD stage", "FVD global", "global − stage", "± sem"],
        [[r["step"], f"{r['train_tflops']:.1f}", f"{r['mean_stage']:.0f}", f"{r['mean_global']:.0f}",
          f"{r['mean_diff']:+.0f}", "" if r["sem_diff"] is None else f"{r['sem_diff']:.0f}"] for r in result["rows"]])
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
