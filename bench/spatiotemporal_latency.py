"""Spatio-temporal against temporal-only TPDiff against vanilla on the default DiT: sampling latency and the
expected training step, each beside its FLOP prediction.

    python bench/spatiotemporal_latency.py            # default DiT, 16 x 32x32 clips, 30 steps, batch 4
    python bench/spatiotemporal_latency.py --quick    # a smoke run of a few seconds

The three pyramids come from the configs: ``configs/vanilla.yaml``, ``configs/default.yaml`` (temporal, r = 2-2)
and ``configs/spatiotemporal.yaml`` (r = 2-2, spatial 1-2: stages 4 x 16x16, 8 x 16x16, 16 x 32x32). All three
sample through ``tpdiff_lightning.method.sampling.sample`` with the same network in one process, repeats alternating.
A training step trains one stage, drawn with the stage weights, so its expected cost is the weighted mean of
the per-stage forward + backward times; each is timed on its own. FLOP predictions count the network with
torch's ``FlopCounterMode`` at each stage's shape. Writes ``bench/results/spatiotemporal_latency.json``.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

import torch
from torch import Tensor

from common import (ROOT, add_common_args, add_sampling_args, build_dit, count_flops, finish_machine_info,
                    headline_clock, interleaved, machine_info, parse_bench_args, print_table, pyramid_from_config,
                    random_text, ratio_stats, sampling_flops, set_threads, summary, write_json)
from tpdiff_lightning.method.pyramid import Stage, TemporalPyramid
from tpdiff_lightning.method.sampling import sample, split_steps

VARIANTS = {"vanilla": ["configs/vanilla.yaml"], "temporal": [], "spatiotemporal": ["configs/spatiotemporal.yaml"]}


def strides(stage: Stage) -> dict[str, int]:
    """The DiT's position keywords for a stage, as the module passes them."""
    return {"stride": stage.stride} if stage.spatial_stride == 1 else {"stride": stage.stride,
                                                                       "spatial_stride": stage.spatial_stride}


def training_step_costs(net, pyramid: TemporalPyramid, batch: int, frame_shape, text, mask, repeats: int,
                        device: str) -> dict[str, Any]:
    """Per-stage forward + backward CPU/wall seconds and FLOPs, and their stage-weighted means."""
    C, H, W = frame_shape
    weights = [w / sum(pyramid.stage_weights) for w in pyramid.stage_weights]
    fns, flops = {}, []
    for stage in pyramid.stages:
        x = torch.randn(batch, C, stage.num_frames, *pyramid.stage_size(H, W, stage.index), device=device)
        t = torch.full((batch,), 500.0, device=device)

        def step(x=x, t=t, stage=stage) -> None:
            net.zero_grad(set_to_none=True)
            net(x, t, text, mask, **strides(stage)).square().mean().backward()

        fns[f"stage{stage.index}"] = step
        flops.append(count_flops(step))
    times = interleaved(fns, repeats, warmup=1, device=device)
    out: dict[str, Any] = {"stage_weights": weights, "flops_per_stage": flops,
                           "expected_flops": sum(w * f for w, f in zip(weights, flops))}
    for clock in times:
        medians = [summary(times[clock][f"stage{i}"])["median_s"] for i in range(pyramid.num_stages)]
        out[f"{clock}_s_per_stage"] = medians
        out[f"expected_{clock}_s"] = sum(w * m for w, m in zip(weights, medians))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_args(parser, repeats=7)
    parser.add_argument("--train-repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results/spatiotemporal_latency.json")
    add_common_args(parser)
    args = parse_bench_args(parser, argv)
    if args.quick:
        args.repeats, args.train_repeats, args.steps, args.batch = 1, 1, 6, 1
    set_threads(args.threads)
    info = machine_info(args.device)
    net = build_dit(args.size, 3, args.text_dim).to(args.device).eval()
    text, mask = random_text(args.batch, args.text_dim, device=args.device)
    frame_shape = (3, args.resolution, args.resolution)
    pyramids = {name: pyramid_from_config([ROOT / p for p in overlays], num_frames=args.frames)
                for name, overlays in VARIANTS.items()}

    def model(x: Tensor, t: Tensor, stage: Stage) -> Tensor:
        return net(x, t * 1000.0, text, mask, **strides(stage))

    def sampler(pyramid: TemporalPyramid) -> Callable[[], Tensor]:
        def run() -> Tensor:
            with torch.no_grad():
                return sample(model, pyramid, args.batch, frame_shape, args.steps, torch.Generator().manual_seed(0),
                              device=args.device)
        return run

    times = interleaved({k: sampler(p) for k, p in pyramids.items()}, args.repeats,
                        warmup=0 if args.quick else 1, device=args.device)

    def forward(x: Tensor, stride: int, spatial_stride: int = 1) -> Tensor:
        t = torch.full((x.shape[0],), 500.0, device=x.device)
        return net(x, t, text, mask, stride=stride, spatial_stride=spatial_stride)

    flops = {k: sampling_flops(forward, p, split_steps(args.steps, p.partition), args.batch, frame_shape, args.device)
             for k, p in pyramids.items()}
    net.train()
    training = {k: training_step_costs(net, p, args.batch, frame_shape, text, mask, args.train_repeats, args.device)
                for k, p in pyramids.items()}
    clock = headline_clock(args.device)
    rows, results = [], {}
    for name, p in pyramids.items():
        speed = ratio_stats(times[clock]["vanilla"], times[clock][name])["median_ratio"]
        predicted = flops["vanilla"]["total"] / flops[name]["total"]
        train_speed = training["vanilla"][f"expected_{clock}_s"] / training[name][f"expected_{clock}_s"]
        train_predicted = training["vanilla"]["expected_flops"] / training[name]["expected_flops"]
        results[name] = {
            "stages": [{"frames": s.num_frames, "size": list(p.stage_size(args.resolution, args.resolution, s.index)),
                        "stride": s.stride, "spatial_stride": s.spatial_stride, "t_start": s.t_start, "t_end": s.t_end}
                       for s in p.stages],
            "steps_per_stage": split_steps(args.steps, p.partition),
            "sampling": {c: summary(times[c][name]) for c in times}, "sampling_raw_s": {c: times[c][name] for c in times},
            "sampling_flops": flops[name], "sampling_speedup": speed, "sampling_flop_predicted": predicted,
            "sampling_measured_over_predicted": speed / predicted,
            "training": training[name], "training_speedup": train_speed, "training_flop_predicted": train_predicted,
            "training_measured_over_predicted": train_speed / train_predicted,
        }
        rows.append([name, " / ".join(f"{s['frames']}x{s['size'][0]}" for s in results[name]["stages"]),
                     f"{results[name]['sampling'][clock]['median_s']:.3f}", f"{speed:.2f}x", f"{predicted:.2f}x",
                     f"{speed / predicted:.2f}", f"{training[name][f'expected_{clock}_s']:.4f}", f"{train_speed:.2f}x",
                     f"{train_predicted:.2f}x", f"{train_speed / train_predicted:.2f}"])
    print(f"{args.size}, batch {args.batch}, {args.steps} sampling steps, {clock} seconds")
    print_table(["pyramid", "stages (frames x px)", "sample s", "speed-up", "FLOP-pred.", "meas/pred",
                 "train step s", "speed-up", "FLOP-pred.", "meas/pred"], rows)
    result = {"bench": "spatiotemporal_latency", "config": vars(args), "clock": clock, "results": results,
              "machine": finish_machine_info(info)}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
