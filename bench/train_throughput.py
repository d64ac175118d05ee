"""Training throughput: step time and activation memory per stage, and TPDiff's expected samples/s against vanilla.

    python bench/train_throughput.py            # default config: dit-tiny, batch 16, 16 frames of 32x32
    python bench/train_throughput.py --quick    # a smoke run of a few seconds
    python bench/train_throughput.py --resolution 64 --out bench/results/train_throughput_64px.json
                                                # 64 tokens per frame, where the backbone dominates the step

One training step here is what ``TPDiffModule.training_step`` does plus the optimizer: encode the captions,
the stage's loss (noise, data-noise alignment, stage-wise interpolation, backbone), backward, gradient
clipping, the module's own AdamW (fused where supported) and the EMA update. A step is timed for each stage
of the 3-stage pyramid and for the vanilla (1-stage) model, alternating between them. TPDiff's expected step time is the stage times weighted
by the stage probabilities; the speed-up is vanilla's step time over it (samples/s ratio).

Memory: on CUDA the peak allocated memory of a step; on CPU the bytes of activations saved for backward
(saved-tensor hooks during the forward; distinct storages, parameters excluded), which is what grows with
the sequence length. Both are also measured with the backbone's ``gradient_checkpointing`` on (``*_checkpointed``):
then only each block's inputs are kept and the block is recomputed in the backward pass. Writes ``bench/results/train_throughput.json``.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from common import (add_common_args, finish_machine_info, headline_clock, interleaved, machine_info, parameter_storages,
                    parse_bench_args, print_table, ratio_stats, set_threads, summary, train_step_flops, write_json)
from tpdiff_lightning.data.synthetic import clip_rng, make_clip
from tpdiff_lightning.models.dit import VideoDiT
from tpdiff_lightning.models.text_encoder import T5TextEncoder
from tpdiff_lightning.training.module import TPDiffModule


def synthetic_batch(batch: int, frames: int, size: int) -> tuple[Tensor, list[str]]:
    """Real synthetic clips ``(B, 3, F, H, W)`` in [-1, 1] with their captions (alignment sees real data)."""
    clips, captions = [], []
    for i in range(batch):
        video, caption, _ = make_clip(clip_rng(0, "train", i), frames, size)  # (F, H, W, 3) uint8
        clips.append(torch.from_numpy(np.ascontiguousarray(video)).permute(3, 0, 1, 2).float() / 127.5 - 1)
        captions.append(caption)
    return torch.stack(clips), captions


def build_module(num_stages: int, args: argparse.Namespace, device: str | None = None) -> TPDiffModule:
    """The default config's module (dit-tiny, small T5, flow, alignment, EMA) with ``num_stages`` stages; its text
    encoder reads bytes, as when bench/results/train_throughput.json was measured (the default now reads words,
    about 4.5x fewer caption tokens, a small part of a step)."""
    torch.manual_seed(0)
    return TPDiffModule(
        backbone=functools.partial(VideoDiT, size=args.size), text_encoder=T5TextEncoder(d_model=128, num_layers=2),
        clip={"num_frames": args.frames, "resolution": args.resolution}, pyramid={"num_stages": num_stages}, objective={"alignment": not args.no_alignment}, optimization={"ema_decay": 0.995, "lr": 1e-3}).to(device or args.device).train()


def autocast_context(mode: str, device: str):
    """bf16 autocast on the device (as Lightning's ``bf16-mixed``), or none."""
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=mode == "bf16")


def train_step(module: TPDiffModule, optimizer: torch.optim.Optimizer, x0: Tensor, captions: list[str],
               stage: int, autocast: str = "none") -> Callable[[], None]:
    """One optimizer step on stage ``stage`` (the body of ``training_step`` with the stage fixed)."""
    def run() -> None:
        with autocast_context(autocast, str(x0.device)):
            text, mask = module.text_encoder(captions)  # (B, L, D)
            loss = module.stage_loss(x0, text, mask, stage, torch.Generator().manual_seed(0))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.denoiser_modules().parameters(), 1.0)
        optimizer.step()
        module.ema.update(module.denoiser_modules())
    return run


def saved_activation_bytes(module: TPDiffModule, x0: Tensor, captions: list[str], stage: int) -> int:
    """Bytes of distinct non-parameter tensors that autograd saves for backward in one stage's forward."""
    params = parameter_storages(module)
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        text, mask = module.text_encoder(captions)
        loss = module.stage_loss(x0, text, mask, stage, torch.Generator().manual_seed(0))
    del loss
    return sum(seen.values())


def with_gradient_checkpointing(module: TPDiffModule, measure: Callable[[], int]) -> int:
    """``measure()`` with the backbone's gradient checkpointing switched on (and back off afterwards)."""
    before = module.backbone.gradient_checkpointing
    module.backbone.gradient_checkpointing = True
    try:
        return measure()
    finally:
        module.backbone.gradient_checkpointing = before


def peak_cuda_bytes(step: Callable[[], None], device: str) -> int:
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="dit-tiny")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-alignment", action="store_true")
    parser.add_argument("--autocast", choices=("none", "bf16"), default="none",
                        help="bf16: the forward under bf16 autocast, as trainer.precision=bf16-mixed runs it")
    parser.add_argument("--out", default="bench/results/train_throughput.json")
    add_common_args(parser)
    args = parse_bench_args(parser, argv)
    if args.quick:
        args.repeats, args.batch, args.resolution = 1, 2, 16
    set_threads(args.threads)
    info = machine_info(args.device)
    x0, captions = synthetic_batch(args.batch, args.frames, args.resolution)
    x0 = x0.to(args.device)
    tpdiff, vanilla = build_module(3, args), build_module(1, args)
    vanilla.backbone.load_state_dict(tpdiff.backbone.state_dict())
    opts = {m: m.configure_optimizers()["optimizer"] for m in (tpdiff, vanilla)}  # the optimizer training uses
    steps = {f"stage{s.index}": train_step(tpdiff, opts[tpdiff], x0, captions, s.index, args.autocast)
             for s in tpdiff.pyramid.stages}
    steps["vanilla"] = train_step(vanilla, opts[vanilla], x0, captions, 0, args.autocast)
    times = interleaved(steps, args.repeats,
                        warmup=0 if args.quick else 1, device=args.device)
    clock = headline_clock(args.device)
    med = {k: summary(v)["median_s"] for k, v in times[clock].items()}

    weights = np.asarray(tpdiff.pyramid.stage_weights, dtype=float)
    weights = weights / weights.sum()
    expected = float(sum(w * med[f"stage{i}"] for i, w in enumerate(weights)))
    stages = []
    for s in tpdiff.pyramid.stages:
        row = {"stage": s.index, "frames": s.num_frames, "stride": s.stride, "weight": float(weights[s.index]),
               "step": summary(times[clock][f"stage{s.index}"]), "step_wall": summary(times["wall"][f"stage{s.index}"]),
               "train_flops": train_step_flops(lambda: build_module(3, args, device="cpu"), x0.shape,
                                               captions, s.index)}
        if args.device.startswith("cuda"):
            row["peak_cuda_bytes"] = peak_cuda_bytes(steps[f"stage{s.index}"], args.device)
            row["peak_cuda_bytes_checkpointed"] = with_gradient_checkpointing(
                tpdiff, lambda: peak_cuda_bytes(steps[f"stage{s.index}"], args.device))
        else:
            row["saved_activation_bytes"] = saved_activation_bytes(tpdiff, x0, captions, s.index)
            row["saved_activation_bytes_checkpointed"] = with_gradient_checkpointing(
                tpdiff, lambda: saved_activation_bytes(tpdiff, x0, captions, s.index))
        stages.append(row)
    vanilla_row = {"frames": args.frames, "step": summary(times[clock]["vanilla"]),
                   "step_wall": summary(times["wall"]["vanilla"]),
                   "train_flops": train_step_flops(lambda: build_module(1, args, device="cpu"), x0.shape,
                                                   captions, 0)}
    if args.device.startswith("cuda"):
        vanilla_row["peak_cuda_bytes"] = peak_cuda_bytes(steps["vanilla"], args.device)
        vanilla_row["peak_cuda_bytes_checkpointed"] = with_gradient_checkpointing(
            vanilla, lambda: peak_cuda_bytes(steps["vanilla"], args.device))
    else:
        vanilla_row["saved_activation_bytes"] = saved_activation_bytes(vanilla, x0, captions, 0)
        vanilla_row["saved_activation_bytes_checkpointed"] = with_gradient_checkpointing(
            vanilla, lambda: saved_activation_bytes(vanilla, x0, captions, 0))
    expected_flops = float(sum(w * r["train_flops"] for w, r in zip(weights, stages)))
    result = {
        "bench": "train_throughput", "config": vars(args), "clock": clock,
        "memory_measure": "peak_cuda_bytes (torch.cuda.max_memory_allocated)" if args.device.startswith("cuda") else
        "saved_activation_bytes: distinct non-parameter storages saved for backward in the forward (saved-tensor hooks)",
        "stages": stages, "vanilla": vanilla_row,
        "expected_tpdiff_step_s": expected, "vanilla_step_s": med["vanilla"],
        "speedup_samples_per_s": med["vanilla"] / expected,
        "flop_predicted_speedup": vanilla_row["train_flops"] / expected_flops,
        "stage2_vs_vanilla": ratio_stats(times[clock]["vanilla"], times[clock]["stage2"]),
        "raw_s": times, "machine": finish_machine_info(info),
    }
    mem_key = "peak_cuda_bytes" if args.device.startswith("cuda") else "saved_activation_bytes"
    rows = [[f"stage {r['stage']}", r["frames"], f"{r['weight']:.2f}", r["step"]["median_s"], r["step_wall"]["median_s"],
             f"{r['train_flops'] / 1e9:.1f}", f"{r[mem_key] / 2**20:.1f}", f"{r[mem_key + '_checkpointed'] / 2**20:.1f}"]
            for r in stages]
    rows.append(["vanilla", args.frames, "1.00", vanilla_row["step"]["median_s"], vanilla_row["step_wall"]["median_s"],
                 f"{vanilla_row['train_flops'] / 1e9:.1f}", f"{vanilla_row[mem_key] / 2**20:.1f}",
                 f"{vanilla_row[mem_key + '_checkpointed'] / 2**20:.1f}"])
    print(f"training step ({clock} seconds), batch {args.batch}, {args.frames}x{args.resolution}x{args.resolution}")
    print_table(["", "frames", "weight", f"step s ({clock})", "step s (wall)", "GFLOP", "act. MiB", "checkpointed"], rows)
    print(f"expected TPDiff step {expected:.3f} s against vanilla {med['vanilla']:.3f} s: "
          f"{result['speedup_samples_per_s']:.2f}x samples/s (FLOP-predicted {result['flop_predicted_speedup']:.2f}x)")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
