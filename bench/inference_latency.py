"""Inference latency, vanilla against TPDiff (paper Table 3): same network, batch, resolution and 30 steps.

    python bench/inference_latency.py                   # default DiT (+ tiny diffusers backbones that import)
    python bench/inference_latency.py --quick           # a smoke run of a few seconds
    python bench/inference_latency.py --backbones dit   # only the built-in DiT

Both variants sample through ``tpdiff_lightning.method.sampling.sample`` with the same backbone in one process;
repeats alternate between them and the ratio comes from medians. The FLOP-predicted ratio counts the
backbone's FLOPs (torch's ``FlopCounterMode``) for one forward per stage, times the stage's steps.
Writes ``bench/results/inference_latency.json``.
"""

from __future__ import annotations

import argparse
import importlib
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from common import (add_common_args, add_sampling_args, build_dit, finish_machine_info, headline_clock, interleaved,
                    machine_info, parse_bench_args, print_table, random_text, ratio_stats, sampling_flops, set_threads,
                    summary, write_json)
from tpdiff_lightning.method.pyramid import Stage, TemporalPyramid
from tpdiff_lightning.method.sampling import sample, split_steps


@dataclass
class Subject:
    """One backbone to time: the network, its latent frame shape ``(C, H, W)`` and clip length."""

    name: str
    net: nn.Module
    frame_shape: tuple[int, int, int]
    num_frames: int
    text_dim: int
    anchor_first_frame: bool = False


def denoiser(net: nn.Module, text: Tensor, mask: Tensor, scale: float = 1000.0) -> Callable[[Tensor, Tensor, Stage], Tensor]:
    """The sampler's ``(x, t, stage) -> v``, told ``t * 1000`` and the stage's stride (as the module does)."""
    def model(x: Tensor, t: Tensor, stage: Stage) -> Tensor:
        return net(x, t * scale, text, mask, stride=stage.stride)
    return model


# Tiny diffusers backbones written elsewhere in the project: (backbone module, class, helper module, saver).
DIFFUSERS = {
    "wan": ("tpdiff_lightning.models.wan", "WanBackbone", "tests.helpers.tiny_wan", "save_tiny_wan"),
    "animatediff": ("tpdiff_lightning.models.animatediff", "AnimateDiffBackbone", "tests.helpers.tiny_animatediff",
                    "save_tiny_animatediff"),
    "flux_video": ("tpdiff_lightning.models.flux_video", "FluxVideoBackbone", "tests.helpers.tiny_flux",
                   "save_tiny_flux"),
}
# Clip shapes: Wan's causal VAE gives 1 + 4k latent frames (anchored first frame); the others 16 frames.
DIFFUSERS_SHAPES = {"wan": (9, 16, True), "animatediff": (16, 16, False), "flux_video": (16, 16, False)}


def build_diffusers(name: str, folder: str, in_channels: int = 4, text_dim: int = 32) -> Subject:
    """Save the tiny random model with the project's helper and load it through the backbone class.

    Raises ImportError when the backbone or its helper does not exist (yet), so the caller can skip it.
    """
    module_name, cls_name, helper_name, saver_name = DIFFUSERS[name]
    cls = getattr(importlib.import_module(module_name), cls_name)
    saver = getattr(importlib.import_module(helper_name), saver_name)
    path = saver(folder, in_channels=in_channels, text_dim=text_dim)
    net = cls(in_channels, text_dim, pretrained_path=str(path)).eval()
    frames, size, anchored = DIFFUSERS_SHAPES[name]
    return Subject(name, net, (in_channels, size, size), frames, text_dim, anchored)


def run_subject(subject: Subject, args: argparse.Namespace) -> dict[str, Any]:
    """Latency of both variants, their ratio and the FLOP-predicted ratio, for one backbone."""
    net = subject.net.to(args.device).eval()
    text, mask = random_text(args.batch, subject.text_dim, device=args.device)
    model = denoiser(net, text, mask)
    pyramids = {"vanilla": TemporalPyramid("flow", subject.num_frames, 1, anchor_first_frame=subject.anchor_first_frame),
                "tpdiff": TemporalPyramid("flow", subject.num_frames, args.stages,
                                          anchor_first_frame=subject.anchor_first_frame)}

    def sampler(pyramid: TemporalPyramid) -> Callable[[], Tensor]:
        def run() -> Tensor:
            with torch.no_grad():
                return sample(model, pyramid, args.batch, subject.frame_shape, args.steps,
                              torch.Generator().manual_seed(0), device=args.device)
        return run

    times = interleaved({k: sampler(p) for k, p in pyramids.items()}, args.repeats,
                        warmup=0 if args.quick else 1, device=args.device)

    def forward(x: Tensor, stride: int) -> Tensor:
        t = torch.full((x.shape[0],), 500.0, device=x.device)
        return net(x, t, text, mask, stride=stride)

    flops = {k: sampling_flops(forward, p, split_steps(args.steps, p.partition), args.batch, subject.frame_shape,
                               args.device) for k, p in pyramids.items()}
    clock = headline_clock(args.device)
    ratio = {c: ratio_stats(times[c]["vanilla"], times[c]["tpdiff"]) for c in times}
    predicted = flops["vanilla"]["total"] / flops["tpdiff"]["total"]
    return {
        "backbone": subject.name, "frames": subject.num_frames, "frame_shape": list(subject.frame_shape),
        "stage_frames": [s.num_frames for s in pyramids["tpdiff"].stages],
        "steps_per_stage": split_steps(args.steps, pyramids["tpdiff"].partition),
        "clock": clock, "latency": {c: {k: summary(v) for k, v in times[c].items()} for c in times},
        "latency_raw_s": times, "speedup": ratio[clock]["median_ratio"], "speedup_wall": ratio["wall"]["median_ratio"],
        "speedup_detail": ratio,
        "flops": flops, "flop_predicted_speedup": predicted,
        "speedup_over_predicted": ratio[clock]["median_ratio"] / predicted,
    }


def subjects(args: argparse.Namespace, tmp: str) -> tuple[list[Subject], dict[str, str]]:
    """The backbones to time, and the reason each skipped one was skipped."""
    chosen = args.backbones.split(",")
    out, skipped = [], {}
    if "dit" in chosen:
        net = build_dit(args.size, 3, args.text_dim, args.patch_size)
        out.append(Subject(f"dit ({args.size})", net, (3, args.resolution, args.resolution), args.frames, args.text_dim))
    for name in (n for n in chosen if n in DIFFUSERS):
        try:
            out.append(build_diffusers(name, f"{tmp}/{name}"))
        except (ImportError, AttributeError) as err:  # the backbone is written by another part of the project
            skipped[name] = f"not available: {err}"
    return out, skipped


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="dit,wan,animatediff,flux_video")
    add_sampling_args(parser, repeats=7)
    parser.add_argument("--patch-size", type=int, default=None)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--out", default="bench/results/inference_latency.json")
    add_common_args(parser)
    args = parse_bench_args(parser, argv)
    if args.quick:
        args.repeats, args.steps, args.batch, args.resolution = 1, 6, 1, 16
    set_threads(args.threads)
    info = machine_info(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        subs, skipped = subjects(args, tmp)
        results = [run_subject(s, args) for s in subs]
    clock = headline_clock(args.device)
    rows = [[r["backbone"], r["latency"][clock]["vanilla"]["median_s"], r["latency"][clock]["tpdiff"]["median_s"],
             f"{r['speedup']:.2f}x", f"{r['speedup_wall']:.2f}x", f"{r['flop_predicted_speedup']:.2f}x",
             f"{r['speedup_over_predicted']:.2f}"] for r in results]
    print(f"sampling latency ({clock} seconds), batch {args.batch}, {args.steps} steps, {args.stages} stages (r=2, uniform)")
    print_table(["backbone", "vanilla s", "tpdiff s", "speed-up", "wall speed-up", "FLOP-pred.", "meas/pred"], rows)
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    result = {"bench": "inference_latency", "config": vars(args), "results": results, "skipped": skipped,
              "paper_table3": {"MiniFlux-vid": 1.71, "AnimateDiff": 1.49, "Wan": 1.82},
              "machine": finish_machine_info(info)}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
