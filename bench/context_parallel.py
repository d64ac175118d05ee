"""Context parallelism per pyramid stage on gloo: communication, time and activation memory per rank.

    python bench/context_parallel.py            # DiT-tiny (patch 2), 16 frames of 16x16 and 32x32 latents, degrees 2, 4
    python bench/context_parallel.py --quick    # a smoke run of a few seconds (numbers not meaningful)

For each degree d (d CPU processes in one gloo group, one thread each) and each stage of the default pyramid, one
training forward and backward of the built-in DiT on the group's batch, run two ways side by side:

- ``sequence``: every clip's tokens split over the group (``sequence_split_forward``: Ulysses attention);
- ``batch``: the group's clips split over it (``batch_split_forward``: each rank runs its share, the outputs
  gathered).

It counts the bytes each rank sends (every ``all_to_all_single``) and takes the slowest rank's time per repeat.
``fixed`` splits the sequence at every stage (one degree for the whole run); ``stage-aware`` picks per stage as
``ContextParallel.splits_sequence`` does with ``--min-tokens``. Batches of d clips per group (they divide evenly)
and d + 1 (they do not: a batch split leaves one rank an extra clip, which is where splitting a long sequence
can win; the fewest tokens at which it did is what ``context_parallel_min_tokens`` should be).

Activation memory: the bytes autograd saves for backward on one rank at the full-rate stage with one clip
(sequence split), for degrees 1, 2 and 4, the measure of ``bench/train_throughput.py``.

Attention paths: at the full-rate stage with one clip, the same step by each way a split sequence can attend
(``context_parallel_attention``: Ulysses where the degree divides the heads, ring attention, gathered keys and
values), side by side: time, bytes sent and activation bytes per rank.
Prints tables and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common import (build_dit, free_port, machine_info, parameter_storages, parse_bench_args, print_table,
                    pyramid_from_config, random_text, sync, write_json)
from tpdiff_lightning.distributed.context_parallel import (DEFAULT_MIN_TOKENS, ContextParallel, batch_split_forward,
                                                           sequence_split_forward)
from tpdiff_lightning.models.token_split import token_count

MODES = {"sequence": sequence_split_forward, "batch": batch_split_forward}


class SentBytes:
    """Counts the bytes this rank sends to other ranks through ``all_to_all_single`` while installed."""

    def __init__(self) -> None:
        self.bytes = 0
        self._original = dist.all_to_all_single

    def __enter__(self) -> "SentBytes":
        def counted(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            rank, size = dist.get_rank(group), dist.get_world_size(group)
            rows = input_split_sizes or [input.shape[0] // size] * size
            row_bytes = input[0].numel() * input.element_size() if input.shape[0] else 0
            self.bytes += (sum(rows) - rows[rank]) * row_bytes
            return self._original(output, input, output_split_sizes, input_split_sizes, group=group,
                                  async_op=async_op)
        dist.all_to_all_single = counted
        return self

    def __exit__(self, *exc) -> None:
        dist.all_to_all_single = self._original


def saved_bytes(net, run) -> int:
    """Bytes of distinct non-parameter tensors autograd saves for backward while ``run()`` runs its forward."""
    params = parameter_storages(net)
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    del out
    return sum(seen.values())


def clips(batch: int, frames: int, size: int, channels: int, device: str = "cpu") -> torch.Tensor:
    x = torch.randn(batch, channels, frames, size, size, generator=torch.Generator().manual_seed(batch * frames))
    return x.to(device)


def forward(net, cp: ContextParallel | None, x, text, mask, split=sequence_split_forward):
    t = torch.full((x.shape[0],), 500.0, device=x.device)
    text, mask = text[: x.shape[0]], mask[: x.shape[0]]
    with torch.autocast("cuda", torch.bfloat16, enabled=x.is_cuda):  # GPUs train in bf16
        if cp is None:
            return net(x, t, text, mask)
        return split(net, cp, x, t, text, mask)


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = "cpu"
    if args.device == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        net = build_dit(args.size, args.channels, args.text_dim, args.patch).train().to(device)
        text, mask = (t.to(device) for t in random_text(world + 1, args.text_dim))
        pyramid = pyramid_from_config(num_frames=args.frames)
        rows = []
        cp = ContextParallel(dist.group.WORLD, world, rank)
        stages = [] if args.paths_only else list(itertools.product((world, world + 1), args.latent,
                                                                    enumerate(pyramid.stages)))
        for batch, latent, (i, stage) in stages:
            x = clips(batch, stage.num_frames, latent, args.channels, device)
            times: dict[str, list[float]] = {m: [] for m in MODES}
            sent = {}
            for repeat in range(args.warmup + args.repeats):
                for mode, split in MODES.items():  # side by side, alternating
                    dist.barrier()
                    with SentBytes() as counter:
                        start = time.perf_counter()
                        forward(net, cp, x, text, mask, split).float().square().mean().backward()
                        sync(device)
                        elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64, device=device)
                    net.zero_grad(set_to_none=True)
                    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
                    if repeat >= args.warmup:
                        times[mode].append(float(elapsed))
                    sent[mode] = counter.bytes
            rows.append({"degree": world, "batch": batch, "latent": latent, "stage": i, "frames": stage.num_frames,
                         "tokens": token_count(net, x.shape[2:]),
                         "probability": pyramid.stage_weights[i] / sum(pyramid.stage_weights),
                         **{f"{m}_s": statistics.median(times[m]) for m in MODES},
                         **{f"{m}_sent_mb": sent[m] / 2 ** 20 for m in MODES}})
        full = pyramid.stages[-1]
        memory = 0 if args.paths_only else saved_bytes(net, lambda: forward(
            net, cp, clips(1, full.num_frames, args.latent[-1], args.channels, device), text, mask))
        peak = torch.tensor(memory, dtype=torch.float64, device=device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        paths = attention_paths(net, cp, clips(1, full.num_frames, args.latent[-1], args.channels, device), text, mask,
                                args, device)
        if rank == 0:
            queue.put({"rows": rows, "activation_bytes": float(peak), "paths": paths})
    finally:
        dist.destroy_process_group()


def slowest(value: float, device: str) -> float:
    """The largest of every rank's ``value``."""
    value = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


def attention_paths(net, cp: ContextParallel, x, text, mask, args: argparse.Namespace, device: str) -> list[dict]:
    """One clip's step with its tokens split, by each attention path (side by side, alternating): the slowest
    rank's median time, bytes sent and activation bytes per rank."""
    heads = next(m.heads for m in net.modules() if isinstance(getattr(m, "heads", None), int))
    paths = [p for p in ("ulysses", "ring", "gathered") if p != "ulysses" or heads % cp.size == 0]
    times: dict[str, list[float]] = {p: [] for p in paths}
    sent = {}
    for repeat in range(args.warmup + args.repeats):
        for path in paths:
            dist.barrier()
            with SentBytes() as counter:
                start = time.perf_counter()
                forward(net, replace(cp, attention=path), x, text, mask).float().square().mean().backward()
                sync(device)
                elapsed = slowest(time.perf_counter() - start, device)
            net.zero_grad(set_to_none=True)
            if repeat >= args.warmup:
                times[path].append(elapsed)
            sent[path] = counter.bytes
    return [{"degree": cp.size, "path": p, "tokens": token_count(net, x.shape[2:]), "heads": heads,
             "step_s": statistics.median(times[p]), "sent_mb": sent[p] / 2 ** 20,
             "activation_mb": slowest(saved_bytes(net, lambda: forward(net, replace(cp, attention=p), x, text, mask)),
                                      device) / 2 ** 20} for p in paths]


def print_paths(paths: list[dict]) -> None:
    print_table(["degree", "tokens", "heads", "attention", "step s", "sent MB/rank", "activation MB/rank"],
                [[p["degree"], p["tokens"], p["heads"], p["path"], f"{p['step_s']:.3f}", f"{p['sent_mb']:.2f}",
                  f"{p['activation_mb']:.1f}"] for p in paths])


def run_degree(world: int, args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_worker, args=(world, free_port(), args, queue), nprocs=world, start_method="spawn", join=True)
    return queue.get()


def expected_step(rows: list[dict], choose) -> float:
    """Mean step time over the stage draws, each stage run in the mode ``choose(row)`` returns."""
    return sum(row["probability"] * row[f"{choose(row)}_s"] for row in rows)


def single_process_bytes(args: argparse.Namespace) -> int:
    """Activation bytes of one clip at the full-rate stage in one process (the memory measure's baseline)."""
    device = "cuda:0" if args.device == "cuda" else "cpu"
    net = build_dit(args.size, args.channels, args.text_dim, args.patch).train().to(device)
    text, mask = (t.to(device) for t in random_text(1, args.text_dim))
    full = pyramid_from_config(num_frames=args.frames).stages[-1]
    x = clips(1, full.num_frames, args.latent[-1], args.channels, device)
    return saved_bytes(net, lambda: forward(net, None, x, text, mask))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="dit-tiny")
    parser.add_argument("--patch", type=int, default=2)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--latent", type=int, nargs="+", default=[16, 32], help="latent heights (= widths)")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--text-dim", type=int, default=64)
    parser.add_argument("--degrees", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--min-tokens", type=int, default=DEFAULT_MIN_TOKENS,
                        help="the stage-aware threshold evaluated (default: the strategy's default)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: gloo, one thread per rank; cuda: NCCL, one GPU per rank, bf16 autocast")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds (numbers not meaningful)")
    parser.add_argument("--paths-only", action="store_true",
                        help="only the attention paths at the full-rate stage (the largest --latent)")
    parser.add_argument("--out", default="bench/results/context_parallel.json")
    args = parse_bench_args(parser, argv)
    if args.quick:
        args.size, args.patch, args.frames, args.latent, args.repeats, args.warmup = "dit-nano", 2, 8, [8], 1, 0
    torch.set_num_threads(1)

    if args.device == "cuda" and max(args.degrees) > torch.cuda.device_count():
        parser.error(f"--degrees {max(args.degrees)}: only {torch.cuda.device_count()} GPUs are visible")
    if args.paths_only:
        paths = [p for world in args.degrees for p in run_degree(world, args)["paths"]]
        print_paths(paths)
        result = {"machine": machine_info(args.device), "args": vars(args), "attention_paths": paths}
        write_json(args.out, result)
        return result
    single_bytes = single_process_bytes(args)
    memory = [{"degree": 1, "activation_mb": single_bytes / 2 ** 20, "fraction_of_one_process": 1.0}]
    rows: list[dict] = []
    paths: list[dict] = []
    for world in args.degrees:
        result = run_degree(world, args)
        rows += result["rows"]
        paths += result["paths"]
        memory.append({"degree": world, "activation_mb": result["activation_bytes"] / 2 ** 20,
                       "fraction_of_one_process": result["activation_bytes"] / single_bytes})

    def stage_aware(row: dict) -> str:
        probe = ContextParallel(None, row["degree"], 0, args.min_tokens)
        return "sequence" if probe.splits_sequence(row["tokens"], row["batch"]) else "batch"

    print_table(["degree", "batch", "latent", "stage", "tokens", "seq s", "batch s", "seq sent MB", "batch sent MB",
                 "stage-aware"],
                [[r["degree"], r["batch"], r["latent"], r["stage"], r["tokens"], f"{r['sequence_s']:.3f}", f"{r['batch_s']:.3f}",
                  f"{r['sequence_sent_mb']:.2f}", f"{r['batch_sent_mb']:.2f}", stage_aware(r)] for r in rows])
    summary = []
    for world, extra, latent in itertools.product(args.degrees, (0, 1), args.latent):
        batch = world + extra
        group = [r for r in rows if (r["degree"], r["batch"], r["latent"]) == (world, batch, latent)]
        fixed, aware = expected_step(group, lambda r: "sequence"), expected_step(group, stage_aware)
        best = expected_step(group, lambda r: min(("sequence", "batch"), key=lambda m: r[f"{m}_s"]))
        sequence_wins = [r["tokens"] for r in group if r["sequence_s"] <= r["batch_s"]]
        summary.append({"degree": world, "batch": batch, "latent": latent, "fixed_step_s": fixed,
                        "stage_aware_step_s": aware, "best_step_s": best, "stage_aware_speedup": fixed / aware,
                        "fewest_tokens_where_sequence_wins": min(sequence_wins) if sequence_wins else None})
    print()
    print_table(["degree", "batch", "latent", "fixed s", "stage-aware s", "best s", "speed-up", "seq wins from"],
                [[s["degree"], s["batch"], s["latent"], f"{s['fixed_step_s']:.3f}", f"{s['stage_aware_step_s']:.3f}",
                  f"{s['best_step_s']:.3f}", f"{s['stage_aware_speedup']:.2f}",
                  s["fewest_tokens_where_sequence_wins"]] for s in summary])
    print()
    print_table(["degree", "activation MB/rank", "of one process"],
                [[m["degree"], f"{m['activation_mb']:.1f}", f"{m['fraction_of_one_process']:.3f}"] for m in memory])
    print()
    print_paths(paths)
    result = {"machine": machine_info(args.device), "args": vars(args), "stages": rows, "summary": summary,
              "activation_memory": memory, "attention_paths": paths}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
