"""Cost of data-noise alignment over the global batch, in a real multi-process gloo world on this CPU.

    python bench/global_alignment.py                  # global batch 32, 128, 512 at the default latent shape
    python bench/global_alignment.py --quick          # a smoke run of a few seconds

Each rank holds ``global_batch / world`` clips. Reported per global batch (medians over repeats, rank 0):
the whole ``align_noise_global`` call, and its parts: the noise all_gather, the cost rows plus their
all_gather, and the Hungarian solve on the ``(B_g, B_g)`` cost. For comparison, the per-rank (local)
alignment of the same slice. The default shape is the default config's last, full-rate stage
``(3, 16, 32, 32)``, the largest one. Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common import free_port, parse_bench_args
from tpdiff_lightning.method.alignment import align_noise, alignment_cost, hungarian_permutation
from tpdiff_lightning.method.global_alignment import align_noise_global, gather


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, each started together on every rank."""
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = []
    try:
        for global_batch in args.global_batches:
            B = global_batch // world
            g = torch.Generator().manual_seed(rank)
            data = torch.randn(B, *args.shape, generator=g)
            noise = torch.randn(B, *args.shape, generator=g)
            noise_g = gather(noise, None)
            cost = gather(alignment_cost(data, noise_g), None).double().numpy()  # (B_g, B_g)
            align_noise_global(data, noise)  # warm-up
            results.append({
                "global_batch": global_batch, "local_batch": B,
                "total_s": timed(lambda: align_noise_global(data, noise), args.repeats),
                "gather_noise_s": timed(lambda: gather(noise, None), args.repeats),
                "cost_and_gather_s": timed(lambda: gather(alignment_cost(data, noise_g), None), args.repeats),
                "hungarian_s": timed(lambda: hungarian_permutation(cost), args.repeats),
                "local_alignment_s": timed(lambda: align_noise(data, noise), args.repeats),
                "gathered_noise_mib": noise_g.numel() * noise_g.element_size() / 2**20,
            })
        if rank == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2, help="gloo processes (ranks)")
    parser.add_argument("--global-batches", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--shape", type=int, nargs="+", default=[3, 16, 32, 32], help="(C, F, H, W) of one clip")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="global batch 8 and 32, a (3, 4, 16, 16) clip, 1 repeat")
    parser.add_argument("--out", default="bench/results/global_alignment.json")
    args = parse_bench_args(parser)
    if args.quick:
        args.global_batches, args.shape, args.repeats = [8, 32], [3, 4, 16, 16], 1
    for gb in args.global_batches:
        if gb % args.world:
            raise ValueError(f"global batch {gb} is not divisible by world={args.world}; expected equal local batches")

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "rows.json")
        mp.start_processes(worker, args=(args.world, free_port(), args, path), nprocs=args.world,
                           start_method="spawn", join=True)
        rows = json.loads(Path(path).read_text())
    result = {"machine": platform.processor() or platform.machine(), "threads_per_rank": 1,
              "config": vars(args), "rows": rows}
    print(f"world {args.world} (gloo, CPU), clip {tuple(args.shape)}; times in ms, medians, rank 0")
    head = ("global B", "local B", "total", "gather noise", "cost+gather", "hungarian", "local align", "noise MiB")
    print("".join(f"{h:>13s}" for h in head))
    for r in rows:
        vals = [r["total_s"], r["gather_noise_s"], r["cost_and_gather_s"], r["hungarian_s"], r["local_alignment_s"]]
        print(f"{r['global_batch']:13d}{r['local_batch']:13d}" + "".join(f"{1e3 * v:13.1f}" for v in vals)
              + f"{r['gathered_noise_mib']:13.1f}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
