"""Convergence at equal compute (paper Fig. 4 at CPU scale): FVD against training compute, vanilla vs TPDiff.

    python bench/convergence.py --runs tpdiff-flow,vanilla-flow --budget-minutes 6
    python bench/convergence.py --runs tpdiff-ddim,vanilla-ddim,tpdiff-flow-noalign --seeds 0,1
    python bench/convergence.py --report          # only analyse and plot what the JSON holds
    python bench/convergence.py --quick --data-root <tiny synthetic shards>   # smoke run

Each run is ``python lightning_cli.py fit --config configs/default.yaml [--config <overlay>]`` in a
subprocess, with the FVD curve (real I3D, ``FVDCurve``) every ``--fvd-every`` steps and a stop once
``--budget-minutes`` of training time (evaluation excluded, as FVDCurve counts it) are spent. FVD points
are read back from the TensorBoard event files. A finished run is appended to the JSON, so the study
runs in pieces and resumes; a run stopped half-way resumes from its ``last.ckpt``, and ``--extend`` continues
finished runs from theirs to a larger budget (the FVD points after that checkpoint are replaced).

Compute has two axes: training seconds (wall clock, noisy on a shared machine) and backbone training
FLOPs, counted with torch's counter for each (stage, batch shape) the run trained and summed over its steps
(``TrainingBudget`` logs them), which no other process can disturb. Each FVD point also carries the caption
accuracy (colour and direction) of the same generated clips.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` when imported as bench.convergence

import lightning as L  # noqa: E402

from common import parse_bench_args  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNS: dict[str, list[str]] = {
    "tpdiff-flow": [],
    "vanilla-flow": ["configs/vanilla.yaml"],
    "tpdiff-ddim": ["configs/ddim.yaml"],
    "vanilla-ddim": ["configs/ddim_vanilla.yaml"],
    "tpdiff-flow-noalign": ["configs/ablations/no_alignment.yaml"],
    "tpdiff-flow-global": ["configs/flow_velocity_global.yaml"],
    "tpdiff-flow-spatiotemporal": ["configs/spatiotemporal.yaml"],
    "tpdiff-flow-spatiotemporal-centre": ["configs/spatiotemporal.yaml", "configs/spatiotemporal_centre.yaml"],
    "tpdiff-flow-token-budget": ["configs/token_budget.yaml"],
    # The motion study: the runs above on the data and DiT that learn the direction of motion (configs/motion.yaml).
    "tpdiff-flow-motion": ["configs/motion.yaml"],
    "vanilla-flow-motion": ["configs/motion.yaml", "configs/vanilla.yaml"],
    "tpdiff-flow-spatiotemporal-motion": ["configs/motion.yaml", "configs/spatiotemporal.yaml"],
}
RUNS.update({f"tpdiff-flow-{p.stem}": [f"configs/ablations/{p.name}"]
             for p in sorted((ROOT / "configs" / "ablations").glob("*.yaml")) if p.stem != "no_alignment"})
PAIRS = {"flow": ("tpdiff-flow", "vanilla-flow"), "ddim": ("tpdiff-ddim", "vanilla-ddim"),
         "flow-noalign": ("tpdiff-flow-noalign", "vanilla-flow"),
         "motion": ("tpdiff-flow-motion", "vanilla-flow-motion")}
# Two ways of training TPDiff compared at equal FLOPs (seed means only): (option, baseline).
COMPARISONS = {"flow-token-budget": ("tpdiff-flow-token-budget", "tpdiff-flow")}
CAPTION_FACTORS = ("colour_accuracy", "direction_accuracy")


class TrainingBudget(L.Callback):
    """Stop training once the FVD curve's training clock (evaluation excluded) reaches ``minutes``, or once
    the backbone's training FLOPs reach ``tflops``: a budget that other processes on the machine cannot shift.
    The FLOPs are counted with torch's counter on the first step of each (stage, batch shape) and summed over
    the steps trained, and logged at every step as ``compute/backbone_tflops`` (the FVD points' x axis).
    Each tenth of the budget spent prints one line, ``label`` first (the study runs with no progress bar)."""

    def __init__(self, minutes: float | None = None, tflops: float | None = None, label: str = ""):
        budget = minutes if tflops is None else tflops
        if (minutes is None) == (tflops is None) or not budget > 0:
            raise ValueError(f"minutes={minutes}, tflops={tflops}; expected exactly one positive budget")
        self.minutes, self.tflops, self.label = minutes, tflops, label
        self.flops = 0.0
        self._tenths_reported = 0  # a resumed run reports where it is at its first step
        self._per_step: dict[tuple[int, tuple[int, ...] | None], float] = {}
        self._key: tuple[int, tuple[int, ...] | None] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"flops": self.flops, "tflops": self.tflops}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.flops = state_dict["flops"]

    @staticmethod
    def step_flops(pl_module, batch, stage: int) -> float:
        """Backbone forward+backward FLOPs of one training step of ``batch``'s shape at ``stage``."""
        import torch

        from common import count_flops

        x0 = pl_module.batch_latents(batch)  # (B, C, F, H, W)
        pyramid = pl_module.pyramid_for(x0.shape[2])
        text, mask = pl_module.text_encoder(list(batch["caption"]))
        s = pyramid.stages[stage]
        x = torch.zeros(pyramid.stage_shape(x0, s.index), device=x0.device)
        t = torch.full((x.shape[0],), 500.0, device=x0.device)
        flops = count_flops(lambda: pl_module.backbone(x, t, text.detach(), mask, **pl_module.stage_strides(s))
                            .square().mean().backward())
        pl_module.backbone.zero_grad(set_to_none=True)
        return flops

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Counted per (stage, batch shape): token-budget batches hold more clips at the cheap stages. Read
        # before the step, while the module's step counter still names the step this batch trains.
        from tpdiff_lightning.training.flop_meter import step_kind

        self._key = step_kind(pl_module, batch, batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        key = self._key
        if key not in self._per_step:
            self._per_step[key] = self.step_flops(pl_module, batch, key[0])
        self.flops += self._per_step[key]
        if trainer.logger is not None:  # the FLOPs at every step, for the FVD points to be read against
            trainer.logger.log_metrics({"compute/backbone_tflops": self.flops / 1e12}, step=trainer.global_step)
        if self.tflops is not None:
            spent, budget, unit = self.flops / 1e12, self.tflops, "TFLOPs"
        else:
            from tpdiff_lightning.callbacks.fvd_curve import FVDCurve

            curve = next((cb for cb in trainer.callbacks if isinstance(cb, FVDCurve)), None)
            if curve is None:
                raise ValueError("TrainingBudget needs an FVDCurve callback listed before it; found none")
            spent, budget, unit = curve.train_seconds / 60, self.minutes, "training minutes"
        if spent >= budget:
            trainer.should_stop = True
        self.report(trainer, spent, budget, unit)

    def report(self, trainer, spent: float, budget: float, unit: str) -> None:
        """One line each time another tenth of the budget is spent."""
        tenths = min(10, int(10 * spent / budget))
        if tenths > self._tenths_reported and trainer.is_global_zero:
            self._tenths_reported = tenths
            print(f"{self.label}step {trainer.global_step}: {spent:.3g} of {budget:g} {unit} ({10 * tenths}%)",
                  flush=True)


def data_root(args: argparse.Namespace, run: str) -> str:
    """The run's data folder: ``--data-root`` where given, else the last overlay's ``data.init_args.root`` (the
    motion runs' centred clips), else ``data/synthetic``. A run never builds its clips in another kind's folder."""
    if args.data_root:
        return args.data_root
    import yaml

    for overlay in reversed(RUNS[run]):
        root = ((yaml.safe_load((ROOT / overlay).read_text()).get("data") or {}).get("init_args") or {}).get("root")
        if root:
            return root
    return "data/synthetic"


def callbacks(args: argparse.Namespace, run: str, seed: int) -> list[dict[str, Any]]:
    """The run's callbacks: checkpoints for resume, the FVD curve, then the budget (it reads the curve)."""
    return [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"save_last": True, "save_top_k": 0, "every_n_train_steps": args.fvd_every}},
        {"class_path": "tpdiff_lightning.callbacks.fvd_curve.FVDCurve",
         "init_args": {"eval_root": data_root(args, run), "name": "synthetic", "num_videos": args.fvd_videos,
                       "every_n_steps": args.fvd_every, "num_steps": args.fvd_steps, "cache_dir": args.cache_dir,
                       "caption_accuracy": True}},
        {"class_path": "bench.convergence.TrainingBudget",
         "init_args": {**({"tflops": args.budget_tflops} if args.budget_tflops else {"minutes": args.budget_minutes}),
                       "label": f"  {run} seed {seed}: "}},
    ]


def run_dir(args: argparse.Namespace, run: str, seed: int) -> Path:
    return Path(args.out_dir) / "convergence" / f"{run}-s{seed}"


def command(args: argparse.Namespace, run: str, seed: int) -> list[str]:
    """The ``lightning_cli.py fit`` command line of one run."""
    cmd = [sys.executable, str(ROOT / "lightning_cli.py"), "fit", "--config", str(ROOT / "configs" / "default.yaml")]
    for overlay in RUNS[run]:
        cmd += ["--config", str(ROOT / overlay)]
    cmd += [
        f"--seed_everything={seed}", f"--model.init_args.objective.stage_seed={seed}",
        f"--trainer.callbacks={json.dumps(callbacks(args, run, seed))}",
        f"--trainer.max_steps={args.max_steps}", "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={args.out_dir}", "--trainer.logger.init_args.name=convergence",
        f"--trainer.logger.init_args.version={run}-s{seed}", f"--data.init_args.root={data_root(args, run)}",
        "--data.init_args.build_synthetic=true",  # the synthetic set is built at data_root when missing
        f"--data.init_args.batch_size={args.batch}", f"--data.init_args.num_workers={args.workers}",
    ]
    if args.resolution:
        cmd += [f"--data.init_args.resolution={args.resolution}"]
    if "configs/token_budget.yaml" in RUNS[run]:  # the tokens of --batch full-rate clips, at this run's size
        from common import full_rate_tokens

        cmd += [f"--data.init_args.token_budget={args.batch * full_rate_tokens(args.resolution or 32)}"]
    cmd += args.extra
    if (run_dir(args, run, seed) / "checkpoints" / "last.ckpt").is_file():
        cmd += ["--ckpt_path", "last"]
    return cmd


def read_points(folder: Path, num_videos: int) -> list[dict[str, float]]:
    """FVD points of a finished run from its TensorBoard events: step, training seconds, backbone training FLOPs,
    FVD, and the caption accuracy of the same clips where the run logged it."""
    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    ea.Reload()
    tag, tags = f"fvd/synthetic-{num_videos}", ea.Tags()["scalars"]
    for needed in (tag, "compute/backbone_tflops"):
        if needed not in tags:
            raise FileNotFoundError(f"no {needed!r} scalars in {folder}; expected a finished run with FVDCurve and "
                                    "TrainingBudget")
    hours = {e.step: e.value for e in ea.Scalars("compute/gpu_hours")}
    counted = ea.Scalars("compute/backbone_tflops")
    first_fvd = ea.Scalars(tag)[0].step
    if counted[0].step > max(first_fvd, 1):  # resumed from a run that did not log its FLOPs yet
        raise SystemExit(f"{folder}: its FLOPs are logged from step {counted[0].step} only, after its first FVD point "
                         f"(step {first_fvd}); the run predates the FLOP log: rerun it with --force")
    captions = {name: {e.step: e.value for e in ea.Scalars(f"caption/{name}")}
                for name in ("colour_accuracy", "direction_accuracy") if f"caption/{name}" in tags}
    points = []
    for e in ea.Scalars(tag):
        flops = 1e12 * float(np.interp(e.step, [c.step for c in counted], [c.value for c in counted], left=0.0))
        point = {"step": e.step, "train_seconds": 3600 * hours[e.step], "train_flops": flops, "fvd": e.value}
        point.update({name: values[e.step] for name, values in captions.items() if e.step in values})
        points.append(point)
    return points


def first_reach(points: list[dict[str, float]], level: float, axis: str) -> float | None:
    """Compute (``axis``) of the first point whose FVD is at or below ``level``; None if never."""
    return next((p[axis] for p in points if p["fvd"] <= level), None)


def interpolate(points: list[dict[str, float]], grid: list[float], key: str = "fvd") -> list[float]:
    """A run's ``key`` (FVD, or a caption accuracy) at each training-FLOP value of ``grid``, piecewise linear
    between its evaluations."""
    import numpy as np

    return np.interp(grid, [p["train_flops"] for p in points], [p[key] for p in points]).tolist()


def seed_mean_curves(runs: list[dict[str, Any]], names: tuple[str, str], num: int = 40) -> dict[str, Any] | None:
    """Mean FVD over the seeds both runs of a pair have, on one FLOP grid (the span every curve covers).

    One N = 12 FVD point is noisy (±60 between neighbours), so the first point under a level is partly luck;
    averaging the seeds' curves first gives a steadier reach and the final gap with its seed-to-seed spread.
    """
    import numpy as np

    by_key = {(r["run"], r["seed"]): r for r in runs}
    seeds = sorted(s for (name, s) in by_key if name == names[0] and (names[1], s) in by_key)
    if len(seeds) < 2:
        return None
    curves = {name: [by_key[(name, s)]["points"] for s in seeds] for name in names}
    lo = max(c[0]["train_flops"] for cs in curves.values() for c in cs)
    hi = min(c[-1]["train_flops"] for cs in curves.values() for c in cs)
    grid = np.linspace(lo, hi, num).tolist()
    mean = {name: np.mean([interpolate(c, grid) for c in cs], axis=0).tolist() for name, cs in curves.items()}
    finals = {name: [c[-1]["fvd"] for c in cs] for name, cs in curves.items()}
    gaps = np.subtract(finals[names[0]], finals[names[1]])
    level = mean[names[1]][-1]
    reach = next((x for x, v in zip(grid, mean[names[0]]) if v <= level), None)
    return {"seeds": seeds, "flops_grid": grid, "mean_fvd": mean,
            "mean_final_fvd": {name: float(np.mean(v)) for name, v in finals.items()},
            "final_gap_mean": float(gaps.mean()), "final_gap_sem": float(gaps.std(ddof=1) / np.sqrt(len(gaps))),
            "reach_train_flops_fraction": None if reach is None else reach / grid[-1]}


def analyse(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per pair (TPDiff, vanilla) and seed: both final FVDs, and the compute at which TPDiff first reaches
    vanilla's final FVD as a fraction of vanilla's total compute (the paper claims about 0.5)."""
    by_key = {(r["run"], r["seed"]): r for r in runs}
    out: dict[str, Any] = {}
    for pair, (tp, va) in PAIRS.items():
        rows = []
        for (name, seed), tp_run in sorted(by_key.items()):
            if name != tp or (va, seed) not in by_key:
                continue
            va_run = by_key[(va, seed)]
            level = va_run["points"][-1]["fvd"]
            row = {"seed": seed, "tpdiff_final_fvd": tp_run["points"][-1]["fvd"], "vanilla_final_fvd": level}
            for axis in ("train_flops", "train_seconds"):
                reach = first_reach(tp_run["points"], level, axis)
                row[f"reach_{axis}_fraction"] = None if reach is None else reach / va_run["points"][-1][axis]
            rows.append(row)
        if rows:
            out[pair] = rows
        mean = seed_mean_curves(runs, (tp, va))
        if mean is not None:
            out[f"{pair}-seed-mean"] = mean
    for name, names in COMPARISONS.items():
        mean = seed_mean_curves(runs, names)
        if mean is not None:
            mean["final_caption_accuracy"] = final_caption_accuracy(runs, names, mean["seeds"])
            out[f"{name}-seed-mean"] = mean
    return out


def final_caption_accuracy(runs: list[dict[str, Any]], names: tuple[str, ...], seeds: list[int]
                           ) -> dict[str, dict[str, dict[str, float]]]:
    """Each run's caption accuracy at its last FVD point, mean and standard error over ``seeds`` (runs that
    logged it)."""
    import numpy as np

    by_key = {(r["run"], r["seed"]): r for r in runs}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in names:
        for factor in CAPTION_FACTORS:
            values = [by_key[(name, s)]["points"][-1].get(factor) for s in seeds]
            if all(v is not None for v in values):
                sem = float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
                out.setdefault(name, {})[factor] = {"mean": float(np.mean(values)), "sem": sem}
    return out


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {"bench": "convergence", "runs": []}


def plot(result: dict[str, Any], path: Path) -> None:
    """FVD against training FLOPs, one panel per schedule (and one for the motion study), vanilla and TPDiff
    overlaid."""
    from common import line_plot

    panels = {}
    for schedule in ("flow", "ddim", "motion"):
        series = {}
        for r in result["runs"]:
            if r["run"].endswith(schedule) or (schedule == "flow" and r["run"] == "tpdiff-flow-noalign"):
                series[f"{r['run']} s{r['seed']}"] = ([p["train_flops"] / 1e12 for p in r["points"]],
                                                      [p["fvd"] for p in r["points"]])
        if series:
            panels[schedule] = series
        mean = result.get("analysis", {}).get(f"{schedule}-seed-mean")
        if mean:  # a panel of its own: the seed means are the curves to read
            panels[f"{schedule}, mean of seeds {', '.join(map(str, mean['seeds']))}"] = {
                name: ([x / 1e12 for x in mean["flops_grid"]], values) for name, values in mean["mean_fvd"].items()}
    if panels:
        line_plot(path, panels, "backbone training TFLOPs", f"FVD (N={result['runs'][0]['fvd_videos']})")
        print(f"wrote {path}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="tpdiff-flow,vanilla-flow,tpdiff-ddim,vanilla-ddim,tpdiff-flow-noalign",
                        help=f"comma list of {sorted(RUNS)}")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--budget-minutes", type=float, default=6.0, help="training time per run, evaluation excluded")
    parser.add_argument("--budget-tflops", type=float, default=None,
                        help="budget in backbone training TFLOPs instead of minutes (immune to machine load)")
    parser.add_argument("--max-steps", type=int, default=100_000)
    parser.add_argument("--fvd-every", type=int, default=150)
    parser.add_argument("--fvd-videos", type=int, default=12)
    parser.add_argument("--fvd-steps", type=int, default=15)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=None, help="override the data resolution")
    parser.add_argument("--data-root", default=None,
                        help="the runs' data folder (default: the run's config's root, else data/synthetic)")
    parser.add_argument("--cache-dir", default="outputs/fvd_cache")
    parser.add_argument("--out-dir", default="outputs")
    parser.add_argument("--out", default="bench/results/convergence.json")
    parser.add_argument("--plot", default="docs/convergence.png")
    parser.add_argument("--force", action="store_true", help="rerun runs the JSON already holds")
    parser.add_argument("--extend", action="store_true",
                        help="continue runs the JSON already holds from their last.ckpt, to this (larger) budget")
    parser.add_argument("--report", action="store_true", help="no training: analyse and plot the JSON")
    parser.add_argument("--quick", action="store_true", help="4 steps, one FVD on 2 clips at 3 steps (smoke test)")
    parser.add_argument("extra", nargs="*", help="more LightningCLI overrides, after --")
    args = parse_bench_args(parser, argv)
    if args.force and args.extend:
        parser.error("--force (start again) and --extend (continue) exclude each other")
    if args.quick:
        args.max_steps, args.fvd_every, args.fvd_videos, args.fvd_steps = 4, 4, 2, 3
        args.batch, args.workers, args.resolution = 2, 0, args.resolution or 16
        args.extra += ["--model.init_args.optimization.warmup_steps=1", "--trainer.log_every_n_steps=1"]
    unknown = [r for r in args.runs.split(",") if r not in RUNS]
    if unknown:
        raise ValueError(f"unknown runs {unknown}; expected names from {sorted(RUNS)}")
    out = Path(args.out)
    result = load(out)
    if args.extend and not args.report:  # every finished run to continue must have its checkpoint, before any trains
        done = {(r["run"], r["seed"]) for r in result["runs"]}
        lost = [f"{run} seed {seed} ({run_dir(args, run, seed)}/checkpoints/last.ckpt)"
                for run in args.runs.split(",") for seed in (int(s) for s in args.seeds.split(","))
                if (run, seed) in done and not (run_dir(args, run, seed) / "checkpoints" / "last.ckpt").is_file()]
        if lost:
            raise SystemExit(f"--extend: no checkpoint to continue {', '.join(lost)}; rerun those with --force")
    for run in ([] if args.report else args.runs.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            if any(r["run"] == run and r["seed"] == seed for r in result["runs"]) and not (args.force or args.extend):
                print(f"{run} seed {seed}: already in {out}, skipped (--force reruns it, --extend continues it)")
                continue
            if args.force:
                shutil.rmtree(run_dir(args, run, seed), ignore_errors=True)  # no resume from the old run
            start = time.time()
            budget = f"{args.budget_tflops} TFLOPs" if args.budget_tflops else f"{args.budget_minutes} min"
            print(f"{run} seed {seed}: training for {budget} ...", flush=True)
            # The run's stdout (its progress lines) goes to the terminal; its stderr is kept for the error.
            proc = subprocess.run(command(args, run, seed), cwd=ROOT, stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"run {run} seed {seed} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
            points = read_points(run_dir(args, run, seed), args.fvd_videos)
            resolution = args.resolution or 32
            from common import finish_machine_info, machine_info

            result = load(out)  # again: another process of the study may have added runs meanwhile
            result["runs"] = [r for r in result["runs"] if not (r["run"] == run and r["seed"] == seed)]
            result["runs"].append({"run": run, "seed": seed, "budget_minutes": args.budget_minutes,
                                   "budget_tflops": args.budget_tflops,
                                   "fvd_videos": args.fvd_videos, "fvd_steps": args.fvd_steps, "batch": args.batch,
                                   "resolution": resolution, "wall_seconds": time.time() - start,
                                   "machine": finish_machine_info(machine_info()), "points": points})
            result["analysis"] = analyse(result["runs"])
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")  # after every run, so the study resumes
            print(f"  {len(points)} FVD points, final {points[-1]['fvd']:.1f} at step {points[-1]['step']}", flush=True)
    result = load(out)
    result["analysis"] = analyse(result["runs"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for pair, rows in result["analysis"].items():
        if pair.removesuffix("-seed-mean") in COMPARISONS:
            finals = " vs ".join(f"{name} {v:.1f}" for name, v in rows["mean_final_fvd"].items())
            captions = "; ".join(f"{name} " + ", ".join(f"{f.split('_')[0]} {v['mean']:.0%} ± {v['sem']:.0%}"
                                                        for f, v in factors.items())
                                 for name, factors in rows["final_caption_accuracy"].items())
            print(f"{pair} over seeds {rows['seeds']}: final FVD {finals} (gap {rows['final_gap_mean']:+.1f} ± "
                  f"{rows['final_gap_sem']:.1f} s.e.); caption accuracy {captions or 'not logged'}")
            continue
        if pair.endswith("-seed-mean"):
            finals = " vs ".join(f"{name} {v:.1f}" for name, v in rows["mean_final_fvd"].items())
            print(f"{pair} over seeds {rows['seeds']}: final FVD {finals} (gap {rows['final_gap_mean']:+.1f} "
                  f"± {rows['final_gap_sem']:.1f} s.e.); the mean TPDiff curve reaches vanilla's mean final FVD "
                  f"at {rows['reach_train_flops_fraction']} of the FLOPs")
            continue
        for row in rows:
            print(f"{pair} seed {row['seed']}: final FVD tpdiff {row['tpdiff_final_fvd']:.1f} vanilla "
                  f"{row['vanilla_final_fvd']:.1f}; tpdiff reaches vanilla's final FVD at "
                  f"{row['reach_train_flops_fraction']} of vanilla's FLOPs")
    if args.plot and result["runs"]:
        plot(result, Path(args.plot))
    return result


if __name__ == "__main__":
    main()
