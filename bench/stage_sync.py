"""Rank-synchronised against independent stage sampling: expected data-parallel throughput.

    python bench/stage_sync.py                 # default DiT at the default clip shape, 4 ranks
    python bench/stage_sync.py --quick         # a smoke run of a few seconds

Measures one training step (forward, backward, AdamW) of the default DiT at each pyramid stage, side by side
in one process, then simulates data-parallel steps: every rank draws a stage, and a step lasts as long as
its slowest rank (the gradient all-reduce waits for it). Synchronised ranks all draw the same stage.
Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time

import numpy as np
import torch

from common import parse_bench_args
from tpdiff_lightning.method.pyramid import TemporalPyramid
from tpdiff_lightning.models.dit import VideoDiT


def time_train_step(net, opt, text, frames, stride, args) -> float:
    x = torch.randn(args.batch, 3, frames, args.resolution, args.resolution)
    start = time.perf_counter()
    out = net(x, torch.rand(args.batch) * 1000, text.expand(args.batch, -1, -1), stride=stride)
    out.square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def stage_step_times(pyramid: TemporalPyramid, args) -> list[float]:
    """Median step time per stage; repeats alternate over the stages so machine noise hits all alike."""
    torch.manual_seed(0)
    net = VideoDiT(3, args.text_dim, size=args.size).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    text = torch.randn(1, 8, args.text_dim)
    for stage in pyramid.stages:  # warm-up
        time_train_step(net, opt, text, stage.num_frames, stage.stride, args)
    times: list[list[float]] = [[] for _ in pyramid.stages]
    for _ in range(args.repeats):
        for i, stage in enumerate(pyramid.stages):
            times[i].append(time_train_step(net, opt, text, stage.num_frames, stage.stride, args))
    return [statistics.median(t) for t in times]


def expected_step(times: list[float], probs: list[float], ranks: int) -> dict[str, float]:
    """Exact expected step time: synchronised ``sum_i p_i t_i``; independent ``E[max over ranks]`` by enumeration."""
    sync = sum(p * t for p, t in zip(probs, times))
    indep = sum(np.prod([probs[i] for i in draw]) * max(times[i] for i in draw)
                for draw in itertools.product(range(len(times)), repeat=ranks))
    return {"sync": float(sync), "independent": float(indep)}


def simulate(times: list[float], probs: list[float], ranks: int, steps: int, seed: int) -> dict[str, float]:
    """Sampled stage sequences: mean step time over ``steps`` steps of ``ranks`` ranks."""
    rng = np.random.default_rng(seed)
    t = np.asarray(times)
    draws = rng.choice(len(times), size=(steps, ranks), p=probs)  # (steps, ranks) independent draws
    shared = rng.choice(len(times), size=steps, p=probs)  # (steps,) one draw for all ranks
    return {"sync": float(t[shared].mean()), "independent": float(t[draws].max(1).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="dit-tiny")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16, help="per-rank batch (the default config's)")
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10_000, help="simulated steps")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--text-dim", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="1 repeat, batch 2, 16 px, 8 frames, 1000 steps")
    parser.add_argument("--out", default="bench/results/stage_sync.json")
    args = parse_bench_args(parser)
    if args.quick:
        args.repeats, args.batch, args.resolution, args.frames, args.steps = 1, 2, 16, 8, 1000

    pyramid = TemporalPyramid("flow", args.frames, args.stages)
    w = np.asarray(pyramid.stage_weights, dtype=float)
    probs = list(w / w.sum())  # as TemporalPyramid.sample_stage draws them
    times = stage_step_times(pyramid, args)
    exact = expected_step(times, probs, args.ranks)
    sim = simulate(times, probs, args.ranks, args.steps, seed=0)
    result = {
        "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "config": vars(args),
        "stages": [{"frames": s.num_frames, "stride": s.stride, "prob": p, "step_s": t}
                   for s, p, t in zip(pyramid.stages, probs, times)],
        "expected_step_s": exact, "simulated_step_s": sim,
        "throughput_gain_sync_over_independent": exact["independent"] / exact["sync"],
        "simulated_gain": sim["independent"] / sim["sync"],
    }
    print(f"{'stage':>6s}{'frames':>8s}{'prob':>8s}{'step (s)':>12s}")
    for i, s in enumerate(result["stages"]):
        print(f"{i:6d}{s['frames']:8d}{s['prob']:8.3f}{s['step_s']:12.4f}")
    print(f"\n{args.ranks} ranks, step = slowest rank     {'expected':>10s}{'simulated':>11s}")
    print(f"{'synchronised stages (s/step)':34s}{exact['sync']:10.4f}{sim['sync']:11.4f}")
    print(f"{'independent stages (s/step)':34s}{exact['independent']:10.4f}{sim['independent']:11.4f}")
    print(f"{'throughput gain of sync':34s}{result['throughput_gain_sync_over_independent']:9.2f}x"
          f"{result['simulated_gain']:10.2f}x")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
