"""What FVD costs: I3D clips/s on this machine, and the FVD-eval share of a finished run's compute.

    python bench/fvd_cost.py                                   # I3D speed only
    python bench/fvd_cost.py --run outputs/synthetic/tpdiff-flow   # plus the overhead measured in that run
    python bench/fvd_cost.py --quick

The overhead is read from the run's TensorBoard scalars that ``FVDCurve`` writes:
``compute/fvd_eval_hours`` against ``compute/gpu_hours`` (training, evaluation excluded).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from tpdiff_lightning.metrics.i3d import i3d_features, load_i3d


def i3d_clips_per_s(batch: int, frames: int, size: int, repeats: int, device: str) -> dict:
    model = load_i3d(device=device)
    videos = torch.randint(0, 256, (batch, frames, size, size, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    i3d_features(model, videos[:1])  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        i3d_features(model, videos, batch_size=batch)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"batch": batch, "frames": frames, "input_size": size, "seconds": statistics.median(times),
            "clips_per_s": batch / statistics.median(times)}


def run_overhead(run_dir: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    ea.Reload()
    train = ea.Scalars("compute/gpu_hours")[-1].value
    fvd = ea.Scalars("compute/fvd_eval_hours")[-1].value
    points = [t for t in ea.Tags()["scalars"] if t.startswith("fvd/") and not t.endswith("GPUh")]
    return {"run": run_dir, "train_gpu_hours": train, "fvd_eval_hours": fvd, "overhead": fvd / train,
            "fvd_points": {t: [(e.step, round(e.value, 2)) for e in ea.Scalars(t)] for t in points}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None, help="a finished run folder with FVDCurve scalars")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224, help="input frame size (resized to 224 anyway)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="batch 2, one repeat")
    parser.add_argument("--out", default="bench/fvd_cost.json")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.repeats = 2, 1
    result = {"machine": platform.processor() or platform.machine(), "device": args.device,
              "threads": torch.get_num_threads(),
              "i3d": i3d_clips_per_s(args.batch, 16, args.size, args.repeats, args.device)}
    print(f"I3D on {args.device}: {result['i3d']['clips_per_s']:.2f} clips/s "
          f"(16 frames, batch {args.batch}, {args.size}px input)")
    if args.run:
        result["run"] = run_overhead(args.run)
        r = result["run"]
        print(f"{args.run}: FVD evaluation {r['fvd_eval_hours'] * 3600:.0f} s against training "
              f"{r['train_gpu_hours'] * 3600:.0f} s -> overhead {100 * r['overhead']:.1f}%")
        for tag, pts in r["fvd_points"].items():
            print(f"  {tag}: {pts}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
