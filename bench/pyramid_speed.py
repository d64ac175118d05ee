"""Vanilla against TPDiff with the same network, side by side: sampling latency and training step time.

    python bench/pyramid_speed.py                 # default DiT at the default clip shape
    python bench/pyramid_speed.py --quick         # a smoke run of a few seconds

Prints a table and writes JSON (``--out``). Repeats alternate between the two variants so that
machine noise hits both alike; ratios come from medians.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from tpdiff_lightning.models.dit import VideoDiT
from tpdiff_lightning.pyramid import TemporalPyramid
from tpdiff_lightning.sampling import sample


def build(args) -> VideoDiT:
    torch.manual_seed(0)
    return VideoDiT(3, args.text_dim, size=args.size, patch_size=args.patch_size).eval()


def denoiser(net, text):
    def model(x, t, stage):
        return net(x, t * 1000, text.expand(x.shape[0], -1, -1), stride=stage.stride)
    return model


def forward_flops(net, text, pyramid, args) -> float:
    """FLOPs of one sampling pass (every step of every stage), counted by torch."""
    total = 0.0
    from tpdiff_lightning.sampling import split_steps
    for stage, steps in zip(pyramid.stages, split_steps(args.steps, pyramid.partition)):
        x = torch.zeros(args.batch, 3, stage.num_frames, args.resolution, args.resolution)
        with FlopCounterMode(display=False) as counter:
            net(x, torch.zeros(args.batch), text.expand(args.batch, -1, -1), stride=stage.stride)
        total += steps * counter.get_total_flops()
    return total


def time_sampling(net, text, pyramid, args) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        sample(denoiser(net, text), pyramid, args.batch, (3, args.resolution, args.resolution), args.steps,
               torch.Generator().manual_seed(0))
    return time.perf_counter() - start


def time_train_step(net, text, frames, stride, args) -> float:
    x = torch.randn(args.batch, 3, frames, args.resolution, args.resolution)
    start = time.perf_counter()
    out = net(x, torch.rand(args.batch) * 1000, text.expand(args.batch, -1, -1), stride=stride)
    out.square().mean().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="dit-tiny")
    parser.add_argument("--patch-size", type=int, default=None)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--text-dim", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="1 repeat, 6 steps, 8 frames")
    parser.add_argument("--out", default="bench/pyramid_speed.json")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.steps, args.frames = 1, 6, 8

    net = build(args)
    text = torch.randn(1, 8, args.text_dim)
    variants = {"vanilla": TemporalPyramid("flow", args.frames, 1), "tpdiff": TemporalPyramid("flow", args.frames, 3)}
    time_sampling(net, text, variants["tpdiff"], args)  # warm-up
    latency = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, pyramid in variants.items():
            latency[name].append(time_sampling(net, text, pyramid, args))
    flops = {name: forward_flops(net, text, p, args) for name, p in variants.items()}

    net.train()
    stage_times = {}
    for stage in variants["tpdiff"].stages:
        times = [time_train_step(net, text, stage.num_frames, stage.stride, args) for _ in range(args.repeats + 1)][1:]
        stage_times[stage.num_frames] = statistics.median(times)
    weights = [1 / 3] * 3
    expected_tpdiff = sum(w * stage_times[s.num_frames] for w, s in zip(weights, variants["tpdiff"].stages))
    vanilla_step = stage_times[args.frames]

    med = {k: statistics.median(v) for k, v in latency.items()}
    result = {
        "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "config": vars(args),
        "sampling_s": med, "sampling_speedup": med["vanilla"] / med["tpdiff"],
        "flop_predicted_speedup": flops["vanilla"] / flops["tpdiff"],
        "train_step_s_by_frames": stage_times, "train_speedup_expected": vanilla_step / expected_tpdiff,
    }
    print(f"{'':28s}{'vanilla':>12s}{'tpdiff':>12s}{'ratio':>10s}")
    print(f"{'sampling latency (s)':28s}{med['vanilla']:12.3f}{med['tpdiff']:12.3f}{result['sampling_speedup']:9.2f}x")
    print(f"{'sampling GFLOPs':28s}{flops['vanilla'] / 1e9:12.1f}{flops['tpdiff'] / 1e9:12.1f}"
          f"{result['flop_predicted_speedup']:9.2f}x")
    print(f"{'train step (s, fwd+bwd)':28s}{vanilla_step:12.3f}{expected_tpdiff:12.3f}{result['train_speedup_expected']:9.2f}x")
    for frames, t in stage_times.items():
        print(f"  train step at {frames:3d} frames: {t:.3f} s")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
