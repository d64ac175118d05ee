"""Data-noise alignment overhead (paper appendix A.2: 5.1 / 9.6 / 17.8 ms at batch 4 / 8 / 16).

    python bench/alignment_overhead.py            # batch 4..256, default latent and a Wan-sized latent
    python bench/alignment_overhead.py --quick

Times ``tpdiff_lightning.method.alignment.align_noise`` exactly as ``TPDiffModule.stage_loss`` calls it: on
``Down(x0, S_i)`` (a strided view of the full clip) and noise at stage i's shape, for every stage of the
3-stage pyramid, and splits the time into the cost matrix, the Hungarian algorithm (scipy) and the
permutation of the noise. The per-step overhead is the stage times weighted by the stage probabilities,
and is compared with the training step time of ``bench/results/train_throughput.json`` when present.
Writes ``bench/results/alignment_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from common import (add_common_args, finish_machine_info, machine_info, parse_bench_args, print_table, set_threads,
                    write_json)
from tpdiff_lightning.method.alignment import align_noise, alignment_cost
from tpdiff_lightning.method.pyramid import TemporalPyramid

SHAPES = {"default": ((3, 16, 32, 32), False), "wan": ((16, 21, 60, 104), True)}  # (C, F, H, W), anchored
PAPER_MS = {4: 5.1, 8: 9.6, 16: 17.8}


def time_ms(fn, repeats: int, min_seconds: float = 0.2) -> float:
    """Median CPU milliseconds of ``fn`` over at least ``repeats`` calls and ``min_seconds`` (after a warm-up).

    CPU time of this process, with one torch thread, leaves out the time other processes hold the core;
    a wall clock turns a 1 ms call into 18 ms whenever the scheduler preempts it.
    """
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_seconds and len(times) < 1000):
        cpu = time.process_time()
        fn()
        times.append(time.process_time() - cpu)
    return 1000 * statistics.median(times)


def stage_timing(x0: torch.Tensor, pyramid: TemporalPyramid, i: int, repeats: int) -> dict[str, Any]:
    """Milliseconds of the whole alignment and of its parts at stage i's shape."""
    stage = pyramid.stages[i]
    data = pyramid.downsample(x0, stage.stride)  # (B, C, F_i, H, W), a strided view as in the module
    noise = torch.randn(pyramid.stage_shape(x0, i), generator=torch.Generator().manual_seed(i))
    cost = alignment_cost(data, noise).numpy().astype(np.float64)
    perm = torch.from_numpy(linear_sum_assignment(cost)[1])
    return {
        "stage": i, "frames": stage.num_frames, "elements_per_sample": data[0].numel(),
        "total_ms": time_ms(lambda: align_noise(data, noise), repeats),
        "cost_matrix_ms": time_ms(lambda: alignment_cost(data, noise), repeats),
        "hungarian_ms": time_ms(lambda: linear_sum_assignment(cost), repeats),
        "permute_ms": time_ms(lambda: noise[perm], repeats),
    }


def train_step_seconds(path: Path) -> tuple[float, int] | None:
    """TPDiff's expected training step time and its batch, from the training-throughput result."""
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    return result["expected_tpdiff_step_s"], result["config"]["batch"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="4,8,16,64,256")
    parser.add_argument("--shapes", default="default,wan")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-gb", type=float, default=3.0,
                        help="skip a case whose clip batch alone would exceed this many GB (memory is shared)")
    parser.add_argument("--train-result", default="bench/results/train_throughput.json")
    parser.add_argument("--out", default="bench/results/alignment_overhead.json")
    add_common_args(parser)
    args = parse_bench_args(parser, argv)
    if args.quick:
        args.batches, args.repeats = "4,16", 1
    set_threads(args.threads)
    if args.quick:
        args.max_gb = min(args.max_gb, 0.2)
    info = machine_info("cpu")
    step = train_step_seconds(Path(args.train_result))
    cases, skipped, rows = [], [], []
    for name in args.shapes.split(","):
        shape, anchored = SHAPES[name]
        pyramid = TemporalPyramid("flow", shape[1], 3, anchor_first_frame=anchored)
        weights = np.asarray(pyramid.stage_weights) / sum(pyramid.stage_weights)
        for batch in (int(b) for b in args.batches.split(",")):
            gb = batch * int(np.prod(shape)) * 4 / 1e9
            if gb > args.max_gb:
                skipped.append({"shape": name, "batch": batch, "why": f"clip batch is {gb:.1f} GB > --max-gb {args.max_gb}"})
                continue
            x0 = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))  # (B, C, F, H, W)
            stages = [stage_timing(x0, pyramid, i, args.repeats) for i in range(pyramid.num_stages)]
            per_step = float(sum(w * s["total_ms"] for w, s in zip(weights, stages)))
            case = {"shape": name, "latent": list(shape), "batch": batch, "stages": stages, "per_step_ms": per_step,
                    "full_rate_ms": stages[-1]["total_ms"], "paper_ms": PAPER_MS.get(batch)}
            if step is not None and name == "default":
                # Step time scaled linearly from the measured batch (exact at that batch).
                case["step_fraction"] = per_step / 1000 / (step[0] * batch / step[1])
                case["step_fraction_measured_batch"] = step[1]
            cases.append(case)
            last = stages[-1]
            rows.append([name, batch, f"{per_step:.2f}", f"{last['total_ms']:.2f}", f"{last['cost_matrix_ms']:.2f}",
                         f"{last['hungarian_ms']:.3f}", f"{last['permute_ms']:.2f}",
                         f"{100 * case['step_fraction']:.2f}%" if "step_fraction" in case else "-",
                         PAPER_MS.get(batch, "-")])
            del x0
    print("alignment overhead (CPU ms, one thread); columns after 'per step' are the full-rate stage")
    print_table(["shape", "batch", "per step", "full-rate", "cost", "hungarian", "permute", "of step", "paper"], rows)
    for s in skipped:
        print(f"skipped {s['shape']} batch {s['batch']}: {s['why']}")
    result = {"bench": "alignment_overhead", "config": vars(args), "cases": cases, "skipped": skipped,
              "train_step": {"expected_tpdiff_step_s": step[0], "batch": step[1]} if step else None,
              "paper_ms": PAPER_MS, "machine": finish_machine_info(info)}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
