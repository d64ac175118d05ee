"""Paper Table 2, row by row: every ``configs/ablations`` overlay against vanilla, beside the paper's numbers.

    python bench/ablations.py            # dit-tiny, batch 4, 16 frames of 32x32, 30 steps
    python bench/ablations.py --quick
    python bench/ablations.py --quality-only   # refill the FVD columns after more convergence runs

For each row (the default config and each overlay) the pyramid is built from the merged YAML and:
- inference speed-up: 30-step sampling with the same network, timed interleaved with vanilla (medians);
- FLOP-predicted inference speed-up (torch's counter, per stage times its steps);
- training compute per sample against vanilla: forward+backward FLOPs per stage, weighted by the stage
  probabilities. The paper's "train speed-up" is GPU-hours to equal quality, which also contains the
  convergence effect; only ``bench/convergence.py`` measures that.
- quality at equal compute: the final FVD of the row's convergence runs (``tpdiff-flow-<row>`` in
  ``bench/convergence.py``, equal training FLOPs) beside vanilla's of the same seed, when
  ``bench/results/convergence.json`` has them.
Writes ``bench/results/ablations.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from inference_latency import denoiser

from common import (ROOT, add_common_args, add_sampling_args, build_dit, count_flops, finish_machine_info,
                    headline_clock, interleaved, machine_info, parse_bench_args, print_table, pyramid_from_config,
                    random_text, sampling_flops, set_threads, summary, write_json)
from tpdiff_lightning.method.pyramid import TemporalPyramid
from tpdiff_lightning.method.sampling import sample, split_steps

# Paper Table 2 (ICLR version): VBench total score, train speed-up (to equal quality), inference speed-up.
PAPER = {
    "default": {"row": "3 / 1-1-1 / 2 / align", "ts": 80.76, "train": 2.16, "infer": 1.49},
    "no_alignment": {"row": "3 / 1-1-1 / 2 / no align", "ts": 79.16, "train": 1.75, "infer": 1.49},
    "stages4": {"row": "4 / 1-1-1-1 / 2", "ts": 80.14, "train": 1.82, "infer": 1.65},
    "stages5": {"row": "5 / 1-1-1-1-1 / 2", "ts": 80.03, "train": 1.71, "infer": 1.74},
    "partition_2-1-1": {"row": "3 / 2-1-1 / 2", "ts": 79.82, "train": 1.92, "infer": 1.62},
    "partition_1-1-2": {"row": "3 / 1-1-2 / 2", "ts": 80.94, "train": 1.62, "infer": 1.36},
    "reductions_4-4": {"row": "3 / 1-1-1 / 4", "ts": 80.12, "train": 1.38, "infer": 1.79},
    "reductions_4-2": {"row": "3 / 1-1-1 / 4-2", "ts": 80.65, "train": 2.01, "infer": 1.54},
    "reductions_2-4": {"row": "3 / 1-1-1 / 2-4", "ts": 80.18, "train": 1.76, "infer": 1.68},
}
# The convergence run that trains each row (bench/convergence.py run names).
CONVERGENCE_RUN = {"default": "tpdiff-flow", "no_alignment": "tpdiff-flow-noalign"}


def rows_from_configs() -> dict[str, list[Path]]:
    """Row name -> overlays on top of ``configs/default.yaml``."""
    rows = {"default": []}
    for path in sorted((ROOT / "configs" / "ablations").glob("*.yaml")):
        rows[path.stem] = [path]
    return rows


def train_flops_per_sample(net: torch.nn.Module, pyramid: TemporalPyramid, frame_shape: tuple[int, int, int],
                           text: torch.Tensor, mask: torch.Tensor) -> float:
    """Expected forward+backward FLOPs of one training sample under the stage probabilities."""
    C, H, W = frame_shape
    total = sum(pyramid.stage_weights)
    flops = 0.0
    for stage, w in zip(pyramid.stages, pyramid.stage_weights):
        x = torch.randn(1, C, stage.num_frames, H, W)
        flops += w / total * count_flops(
            lambda: net(x, torch.full((1,), 500.0), text[:1], mask[:1], stride=stage.stride).square().mean().backward())
    return flops


def final_fvds(path: Path) -> dict[str, dict[int, float]]:
    """Run name -> {seed: final FVD} from the convergence results, if any."""
    if not path.is_file():
        return {}
    out: dict[str, dict[int, float]] = {}
    for run in json.loads(path.read_text()).get("runs", []):
        if run.get("points"):
            out.setdefault(run["run"], {})[int(run["seed"])] = run["points"][-1]["fvd"]
    return out


def quality(row_fvds: dict[int, float] | None, vanilla_fvds: dict[int, float] | None) -> dict[str, Any]:
    """A row's final FVDs beside vanilla's of the same seeds (JSON keys are strings)."""
    row_fvds, vanilla_fvds = row_fvds or {}, vanilla_fvds or {}
    seeds = sorted(int(s) for s in row_fvds)
    return {"final_fvd": {str(s): row_fvds[s] for s in seeds},
            "vanilla_final_fvd": {str(s): vanilla_fvds[s] for s in seeds if s in vanilla_fvds}}


def fvd_cell(row: dict[str, Any]) -> str:
    """``"987 vs 882 (s0)"`` per seed, or ``"-"`` when the row has no convergence run yet."""
    if not row.get("final_fvd"):
        return "-"
    vanilla = row.get("vanilla_final_fvd") or {}
    return ", ".join(f"{fvd:.0f} vs {vanilla[s]:.0f} (s{s})" if s in vanilla else f"{fvd:.0f} (s{s})"
                     for s, fvd in row["final_fvd"].items())


def print_rows(result: dict[str, Any]) -> None:
    config = result["config"]
    table = []
    for row in result["rows"]:
        paper = row.get("paper") or {}
        table.append([row["name"], "-".join(map(str, row["stage_frames"])), f"{row['infer_speedup']:.2f}x",
                      f"{row['infer_flop_predicted']:.2f}x", f"{paper.get('infer', '-')}x",
                      f"{row['train_compute_ratio']:.2f}x", f"{paper.get('train', '-')}x", fvd_cell(row),
                      paper.get("ts", "-")])
    print(f"Table 2 rows against vanilla (dit-tiny, batch {config['batch']}, {config['steps']} steps, "
          f"{result['clock']} seconds); final FVD at equal training FLOPs against vanilla's, per seed")
    print_table(["row", "frames", "infer", "FLOP-pred.", "paper infer", "train FLOP", "paper train",
                 "final FVD vs vanilla", "paper TS"], table)


def refresh_quality(result: dict[str, Any], convergence: Path) -> dict[str, Any]:
    """Fill every row's quality columns from the convergence results (the timings stay as measured)."""
    fvds = final_fvds(convergence)
    for row in result["rows"]:
        run = row.get("convergence_run") or CONVERGENCE_RUN.get(row["name"], f"tpdiff-flow-{row['name']}")
        row.update(quality(fvds.get(run), fvds.get("vanilla-flow")), convergence_run=run)
    result["vanilla"]["final_fvd"] = {str(s): v for s, v in sorted(fvds.get("vanilla-flow", {}).items())}
    return result


def plot_rows(result: dict[str, Any], path: Path) -> None:
    """Grouped bars per Table 2 row: measured and FLOP-predicted inference speed-up, and the paper's."""
    from common import bar_plot

    rows = result["rows"]
    bar_plot(path, [r["name"].replace("reductions_", "red ").replace("partition_", "part ") for r in rows],
             {"ours, measured": [r["infer_speedup"] for r in rows],
              "ours, FLOP-predicted": [r["infer_flop_predicted"] for r in rows],
              "paper (Table 2)": [r["paper"]["infer"] for r in rows]},
             "inference speed-up over vanilla (x)")
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_args(parser, repeats=5)
    parser.add_argument("--convergence", default="bench/results/convergence.json")
    parser.add_argument("--out", default="bench/results/ablations.json")
    parser.add_argument("--plot", default="docs/ablations_speedup.png", help="bar chart PNG ('' for none)")
    parser.add_argument("--replot", action="store_true", help="only redraw the chart from --out")
    parser.add_argument("--quality-only", action="store_true",
                        help="no timing: refill the final-FVD columns of --out from --convergence")
    add_common_args(parser)
    args = parse_bench_args(parser, argv)
    if args.replot or args.quality_only:
        result = json.loads(Path(args.out).read_text())
        if args.quality_only:
            result = refresh_quality(result, Path(args.convergence))
            print_rows(result)
            write_json(args.out, result)
        if args.plot:
            plot_rows(result, Path(args.plot))
        return result
    if args.quick:
        args.repeats, args.steps, args.batch, args.resolution = 1, 5, 1, 16
    set_threads(args.threads)
    info = machine_info(args.device)
    net = build_dit(args.size, 3, args.text_dim).to(args.device).eval()
    text, mask = random_text(args.batch, args.text_dim, device=args.device)
    model = denoiser(net, text, mask)
    shape = (3, args.resolution, args.resolution)
    pyramids = {"vanilla": TemporalPyramid("flow", args.frames, 1)}
    pyramids.update({name: pyramid_from_config(overlays, args.frames) for name, overlays in rows_from_configs().items()})

    def sampler(p: TemporalPyramid):
        def run():
            with torch.no_grad():
                return sample(model, p, args.batch, shape, args.steps, torch.Generator().manual_seed(0), device=args.device)
        return run

    times = interleaved({k: sampler(p) for k, p in pyramids.items()}, args.repeats,
                        warmup=0 if args.quick else 1, device=args.device)
    clock = headline_clock(args.device)
    med = {k: summary(v)["median_s"] for k, v in times[clock].items()}

    def forward(x, stride):
        return net(x, torch.full((x.shape[0],), 500.0, device=x.device), text, mask, stride=stride)

    flops = {k: sampling_flops(forward, p, split_steps(args.steps, p.partition), args.batch, shape, args.device)["total"]
             for k, p in pyramids.items()}
    net.train()
    train = {k: train_flops_per_sample(net, p, shape, text, mask) for k, p in pyramids.items()}
    rows = []
    for name in (k for k in pyramids if k != "vanilla"):
        p = pyramids[name]
        rows.append({
            "name": name, "stage_frames": [s.num_frames for s in p.stages], "partition": list(p.partition),
            "reductions": list(p.reductions), "steps_per_stage": split_steps(args.steps, p.partition),
            "infer_speedup": med["vanilla"] / med[name],
            "infer_speedup_wall": summary(times["wall"]["vanilla"])["median_s"] / summary(times["wall"][name])["median_s"],
            "infer_flop_predicted": flops["vanilla"] / flops[name],
            "train_compute_ratio": train["vanilla"] / train[name],
            "convergence_run": CONVERGENCE_RUN.get(name, f"tpdiff-flow-{name}"),
            "paper": PAPER.get(name),
        })
    result = {"bench": "ablations", "config": vars(args), "clock": clock, "rows": rows,
              "vanilla": {"latency": summary(times[clock]["vanilla"])},
              "raw_s": times, "machine": finish_machine_info(info)}
    refresh_quality(result, Path(args.convergence))
    print_rows(result)
    write_json(args.out, result)
    if args.plot:
        plot_rows(result, Path(args.plot))
    return result


if __name__ == "__main__":
    main()
