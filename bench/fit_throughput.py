"""Real training-loop throughput: `lightning_cli.py fit`, vanilla against TPDiff, per stage, with a profile.

    python bench/fit_throughput.py                    # default config (dit-tiny, batch 16, 16x32x32)
    python bench/fit_throughput.py --resolution 64 --steps 30 --out bench/results/fit_throughput_64px.json
    python bench/fit_throughput.py --code /tmp/old_checkout --code .   # two checkouts side by side
    python bench/fit_throughput.py --quick            # a smoke run (numbers not meaningful)

Each run is the real CLI fit (``tpdiff_lightning.cli.main``) of ``configs/default.yaml`` (plus
``configs/vanilla.yaml`` for vanilla) in a child process, with checkpoints, sampling, FVD and validation
off and the per-step callbacks (``ClipThroughput``, ``LearningRateMonitor``, the progress bar, the
TensorBoard logger) on. The child times every step from one ``on_train_batch_start`` to the next: the
step, the optimizer, the EMA, logging, callbacks and the wait for data. Steps before ``--warmup`` are
dropped. Runs of every (checkout, variant) take turns, ``--repeats`` times, so load from other processes
hits them alike.

Reported: clips/s per stage (batch over the median step time of that stage) and overall, both as drawn
(all clips over all measured time, the stage mix the run drew) and expected (per-stage medians weighted by
the stage probabilities, as the step benchmark weights them); on the process's CPU seconds (one torch
thread, the headline on CPU), on the wall clock (what ``ClipThroughput`` logs) and on the CPU seconds of the
main process plus the data workers (needs psutil); TPDiff's ratio over vanilla
beside the step benchmark's (``bench/train_throughput.py``, same config, same process); and a
``torch.profiler`` breakdown of one step per stage (after the measured steps): time in the labelled parts
of the step and the top operators by self time, with the host-synchronising operators counted
(``aten::item``/``_local_scalar_dense``, ``is_nonzero``, device-to-host copies, stream synchronisations).
On CPU torch's fused AdamW reads each parameter's step count with ``item``; its CUDA kernel does not.

Writes ``bench/results/fit_throughput.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Profiler labels wrapped around the parts of a step, and which label each one is nested in.
PARTS = {
    "optimizer_step": None,  # Lightning's optimizer step: runs the closure (training_step, backward, clipping)
    "training_step": "optimizer_step",
    "text_encoder": "training_step",
    "alignment": "training_step",
    "backbone_forward": "training_step",
    "log": "training_step",
    "backward": "optimizer_step",
    "clip_gradients": "optimizer_step",
    "ema_update": "optimizer_step",
}
SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "cudaStreamSynchronize",
            "cudaDeviceSynchronize", "cudaMemcpy", "Memcpy DtoH")


# ----------------------------------------------------------------------------------------------- child

def fit_config(code: Path, variant: str, args: argparse.Namespace, workdir: Path) -> list[str]:
    """CLI arguments: the checkout's default config with the per-step machinery only, in ``workdir``."""
    import yaml

    cfg = yaml.safe_load((code / "configs" / "default.yaml").read_text())
    trainer = cfg["trainer"]
    trainer["max_steps"] = args.warmup + args.steps + args.profile_steps
    trainer["enable_checkpointing"] = False
    trainer["limit_val_batches"] = 0
    trainer["logger"]["init_args"]["save_dir"] = str(workdir / "logs")
    keep = ("ClipThroughput", "LearningRateMonitor")
    trainer["callbacks"] = [c for c in trainer["callbacks"] if c["class_path"].endswith(keep)]
    data = cfg["data"]["init_args"]
    data["root"] = str(args.data_root)
    data["build_synthetic"] = True  # built there when missing (true: any root; older checkouts take a bool)
    data["resolution"] = args.resolution
    data["batch_size"] = args.batch
    data["train_steps_per_epoch"] = trainer["max_steps"] + 10  # one epoch: no epoch-end work inside the window
    if args.quick:
        data["synthetic_num_train"], data["synthetic_num_eval"] = 64, 4
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    argv = ["--config", str(path)]
    if variant == "vanilla":
        argv += ["--config", str(code / "configs" / "vanilla.yaml")]
    return argv


def labelled(fn, label: str):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        with torch.profiler.record_function(label):
            return fn(*a, **k)
    return wrapper


def label_parts(module) -> None:
    """Wrap the module's parts in profiler labels (instance attributes; the class is untouched)."""
    import tpdiff_lightning.training.module as module_file

    for name, label in (("training_step", "training_step"), ("backward", "backward"), ("log", "log"),
                        ("optimizer_step", "optimizer_step"), ("configure_gradient_clipping", "clip_gradients")):
        setattr(module, name, labelled(getattr(module, name), label))
    module.text_encoder.forward = labelled(module.text_encoder.forward, "text_encoder")
    module.backbone.forward = labelled(module.backbone.forward, "backbone_forward")
    if module.ema is not None:
        module.ema.update = labelled(module.ema.update, "ema_update")
    module_file.align_noise = labelled(module_file.align_noise, "alignment")


def profile_summary(prof, top: int, step_ms: float) -> dict[str, Any]:
    """Labelled parts (inclusive and exclusive ms), the top operators by self time, and host syncs.

    ``step_ms`` is the profiled step's wall time from batch start to batch end; what lies outside Lightning's
    optimizer step (the loop, callbacks, the learning-rate scheduler, the progress bar) is ``loop_other``."""
    events = prof.key_averages()
    inclusive = {e.key: e.cpu_time_total / 1e3 for e in events if e.key in PARTS}
    inclusive["step"] = step_ms
    exclusive = {k: v for k, v in inclusive.items() if k != "step"}
    exclusive["loop_other"] = step_ms - inclusive.get("optimizer_step", 0.0)
    for part, parent in PARTS.items():
        if parent is not None and part in inclusive and parent in exclusive:
            exclusive[parent] -= inclusive[part]
    ops = sorted((e for e in events if e.key not in PARTS and not e.key.startswith("ProfilerStep")),
                 key=lambda e: e.self_cpu_time_total, reverse=True)
    syncs = {e.key: {"count": e.count, "ms": e.cpu_time_total / 1e3} for e in events
             if any(e.key.startswith(s) for s in SYNC_OPS)}
    return {"inclusive_ms": inclusive, "exclusive_ms": exclusive,
            "top_ops": [{"op": e.key, "count": e.count, "self_ms": e.self_cpu_time_total / 1e3} for e in ops[:top]],
            "host_syncs": syncs}


def worker_cpu_seconds() -> float | None:
    """CPU seconds used so far by this process's children (the data loader's workers); None without psutil."""
    try:
        import psutil
    except ImportError:
        return None
    total = 0.0
    for proc in psutil.Process().children(recursive=True):
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:  # a worker that just exited
            pass
    return total


class StepTimer(L.Callback):
    """Callback: wall and CPU time of every step (batch start to batch start), and one profiled step per stage."""

    def __init__(self, measure_from: int, measure_to: int, top: int, device: str):
        self.measure_from, self.measure_to, self.top, self.device = measure_from, measure_to, top, device
        self.steps: list[dict[str, Any]] = []
        self.last: tuple[float, float, int, int] | None = None
        self.profiles: dict[int, dict[str, Any]] = {}
        self.prof = None
        self.profiling_stage: int | None = None
        self.workers_cpu: list[float | None] = []  # the data workers' CPU seconds at the window's start and end

    def stage_of(self, pl_module, batch_idx: int) -> int:
        return pl_module.pyramid.sample_stage(pl_module.stage_generator(pl_module.micro_step(batch_idx)))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        now = (time.perf_counter(), time.process_time())
        if self.last is not None and self.measure_from <= self.last[2] < self.measure_to:
            self.steps.append({"step": self.last[2], "stage": self.last[3], "clips": len(batch["caption"]),
                               "wall_s": now[0] - self.last[0], "cpu_s": now[1] - self.last[1]})
        stage = self.stage_of(pl_module, batch_idx)
        step = trainer.global_step
        if step in (self.measure_from, self.measure_to):
            self.workers_cpu.append(worker_cpu_seconds())
        self.last = (*now, step, stage)
        if step >= self.measure_to and stage not in self.profiles and self.prof is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.startswith("cuda"):
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.__enter__()
            self.prof_start = time.perf_counter()
            self.profiling_stage = stage

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.prof is not None:
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            step_ms = (time.perf_counter() - self.prof_start) * 1e3
            self.prof.__exit__(None, None, None)
            self.profiles[self.profiling_stage] = profile_summary(self.prof, self.top, step_ms)
            self.prof = None
            if len(self.profiles) == pl_module.pyramid.num_stages:
                trainer.should_stop = True


def child(args: argparse.Namespace) -> None:
    """One fit of one variant with one checkout's code; writes the step times and profiles to ``--json``."""
    code = Path(args.code[-1]).resolve()
    sys.path.insert(0, str(code))
    torch.set_num_threads(args.threads)
    from tpdiff_lightning import cli as cli_file

    if not cli_file.__file__.startswith(str(code)):
        raise RuntimeError(f"imported {cli_file.__file__}, expected the checkout {code}")
    with tempfile.TemporaryDirectory() as tmp:
        argv = fit_config(code, args.variant, args, Path(tmp))
        if args.device.startswith("cuda"):
            argv += ["--trainer.accelerator", "gpu"]
        cli = cli_file.main(args=argv, run=False)
        timer = StepTimer(args.warmup, args.warmup + args.steps, args.top, args.device)
        cli.trainer.callbacks.append(timer)
        label_parts(cli.model)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    start, end = (timer.workers_cpu + [None, None])[:2]
    workers = end - start if start is not None and end is not None else None
    weights = [float(w) for w in cli.model.pyramid.stage_weights]
    Path(args.json).write_text(json.dumps({"steps": timer.steps, "workers_cpu_s": workers,
                                           "stage_weights": [w / sum(weights) for w in weights], "profiles": {str(k): v for k, v in
                                                                              timer.profiles.items()},
                                           "num_stages": cli.model.pyramid.num_stages,
                                           "stage_frames": [s.num_frames for s in cli.model.pyramid.stages]}))


# ---------------------------------------------------------------------------------------------- parent

def run_child(code: Path, variant: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--code", str(code), "--variant", variant,
           "--json", str(out), "--resolution", str(args.resolution), "--batch", str(args.batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--profile-steps", str(args.profile_steps),
           "--threads", str(args.threads), "--top", str(args.top), "--device", args.device,
           "--data-root", str(args.data_root)] + (["--quick"] if args.quick else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, args.threads)), PYTHONPATH=str(code))
    done = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"fit of {variant} in {code} failed:\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def aggregate(runs: list[dict[str, Any]], clock: str) -> dict[str, Any]:
    """Clips/s overall and per stage from the steps of every repeat of one (checkout, variant)."""
    steps = [s for r in runs for s in r["steps"]]
    out: dict[str, Any] = {"num_steps": len(steps)}
    for c in ("cpu", "wall"):
        out[f"clips_per_s_{c}"] = sum(s["clips"] for s in steps) / sum(s[f"{c}_s"] for s in steps)
    workers = [r["workers_cpu_s"] for r in runs]
    if all(w is not None for w in workers):  # the data workers' CPU over the same window, added to the main's
        out["clips_per_s_all_processes_cpu"] = (sum(s["clips"] for s in steps)
                                                / (sum(s["cpu_s"] for s in steps) + sum(workers)))
        out["data_workers_cpu_s_per_clip"] = sum(workers) / sum(s["clips"] for s in steps)
    out["per_repeat_clips_per_s"] = [sum(s["clips"] for s in r["steps"]) / sum(s[f"{clock}_s"] for s in r["steps"])
                                     for r in runs]
    stages = []
    for i, frames in enumerate(runs[0]["stage_frames"]):
        mine = [s for s in steps if s["stage"] == i]
        if not mine:
            continue
        row = {"stage": i, "frames": frames, "steps": len(mine)}
        for c in ("cpu", "wall"):
            med = statistics.median(s[f"{c}_s"] for s in mine)
            row[f"step_s_{c}"] = med
            row[f"clips_per_s_{c}"] = statistics.median(s["clips"] for s in mine) / med
        row["profile"] = runs[-1]["profiles"].get(str(i))
        stages.append(row)
    out["stages"] = stages
    weights = runs[0]["stage_weights"]
    if len(stages) == len(weights):  # every stage was drawn: the expected rate at the stage probabilities
        for c in ("cpu", "wall"):
            out[f"expected_clips_per_s_{c}"] = (statistics.median(s["clips"] for s in steps)
                                                / sum(w * s[f"step_s_{c}"] for w, s in zip(weights, stages)))
    return out


def step_benchmark_ratio(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """``bench/train_throughput.py`` on the same config, in this process (the current checkout's code)."""
    import train_throughput

    argv = ["--resolution", str(args.resolution), "--batch", str(args.batch), "--repeats", str(args.step_repeats),
            "--threads", str(args.threads), "--device", args.device, "--out", str(out_dir / "train_throughput.json")]
    result = train_throughput.main(argv + (["--quick"] if args.quick else []))
    return {"speedup_samples_per_s": result["speedup_samples_per_s"],
            "flop_predicted_speedup": result["flop_predicted_speedup"],
            "vanilla_step_s": result["vanilla_step_s"], "expected_tpdiff_step_s": result["expected_tpdiff_step_s"],
            "stage_step_s": [s["step"]["median_s"] for s in result["stages"]]}


def parent(args: argparse.Namespace) -> dict[str, Any]:
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    from common import finish_machine_info, headline_clock, machine_info, print_table, write_json

    codes = [Path(c).resolve() for c in (args.code or [str(ROOT)])]
    names = [args.name[i] if args.name and i < len(args.name) else c.name for i, c in enumerate(codes)]
    clock = headline_clock(args.device)
    info = machine_info(args.device)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {(n, v): [] for n in names for v in ("vanilla", "tpdiff")}
    order = [(n, c, v) for n, c in zip(names, codes) for v in ("vanilla", "tpdiff")]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, code, variant in (order if r % 2 == 0 else order[::-1]):
                t0 = time.perf_counter()
                runs[(name, variant)].append(run_child(code, variant, args, Path(tmp) / f"{name}-{variant}-{r}.json"))
                print(f"repeat {r}: {name} {variant} fit took {time.perf_counter() - t0:.0f} s", flush=True)
        step_bench = step_benchmark_ratio(args, Path(tmp)) if args.step_repeats else None
    results: dict[str, Any] = {}
    for name in names:
        van, tp = aggregate(runs[(name, "vanilla")], clock), aggregate(runs[(name, "tpdiff")], clock)
        res = {"vanilla": van, "tpdiff": tp}
        # "as drawn": all clips over all time of the measured steps (the stage mix the run drew);
        # "expected": per-stage medians weighted by the stage probabilities, as the step benchmark weights them.
        for key in (f"clips_per_s_{clock}", "clips_per_s_wall", f"expected_clips_per_s_{clock}",
                    "expected_clips_per_s_wall", "clips_per_s_all_processes_cpu"):
            if key in van and key in tp:
                res[f"ratio_{key}"] = tp[key] / van[key]
        if step_bench:
            for key in (f"ratio_clips_per_s_{clock}", f"ratio_expected_clips_per_s_{clock}"):
                if key in res:
                    res[f"{key}_over_step_ratio"] = res[key] / step_bench["speedup_samples_per_s"]
        results[name] = res
    result = {"bench": "fit_throughput", "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "clock": clock, "codes": dict(zip(names, map(str, codes))), "results": results,
              "step_benchmark": step_bench, "raw": {f"{n}/{v}": rs for (n, v), rs in runs.items()},
              "machine": finish_machine_info(info)}

    print(f"\nreal fit, batch {args.batch}, 16x{args.resolution}x{args.resolution}, {args.steps} steps after "
          f"{args.warmup} warm-up, x{args.repeats} repeats; clips/s")
    rows = []
    for name in names:
        for variant in ("vanilla", "tpdiff"):
            agg = results[name][variant]
            per_stage = " / ".join(f"{s[f'clips_per_s_{clock}']:.1f}" for s in agg["stages"])
            rows.append([name, variant, f"{agg[f'clips_per_s_{clock}']:.1f}",
                         f"{agg.get(f'expected_clips_per_s_{clock}', float('nan')):.1f}", per_stage,
                         f"{agg['clips_per_s_wall']:.1f}", f"{agg.get('clips_per_s_all_processes_cpu', float('nan')):.1f}",
                         agg["num_steps"]])
    print_table(["code", "variant", f"clips/s ({clock}, as drawn)", "expected", "per stage", "wall",
                 "all-process CPU", "steps"], rows)
    for name in names:
        res = results[name]
        line = (f"{name}: fit ratio {res[f'ratio_clips_per_s_{clock}']:.2f}x as drawn, "
                f"{res.get(f'ratio_expected_clips_per_s_{clock}', float('nan')):.2f}x expected, "
                f"{res['ratio_clips_per_s_wall']:.2f}x wall, "
                f"{res.get('ratio_clips_per_s_all_processes_cpu', float('nan')):.2f}x all-process CPU")
        if step_bench:
            line += (f"; step benchmark {step_bench['speedup_samples_per_s']:.2f}x: "
                     f"{100 * res.get(f'ratio_expected_clips_per_s_{clock}_over_step_ratio', float('nan')):.0f}% kept "
                     f"(expected), {100 * res[f'ratio_clips_per_s_{clock}_over_step_ratio']:.0f}% (as drawn)")
        print(line)
    if len(names) > 1:
        for name in names[1:]:
            for variant in ("tpdiff", "vanilla"):
                for key in (f"clips_per_s_{clock}", f"expected_clips_per_s_{clock}", "clips_per_s_wall"):
                    gain = results[name][variant].get(key, float("nan")) / results[names[0]][variant].get(key, float("nan"))
                    print(f"{name} over {names[0]}, {variant}, {key}: {gain:.3f}x")
    name = names[-1]
    for variant in ("vanilla", "tpdiff"):
        for s in results[name][variant]["stages"]:
            if not s["profile"]:
                continue
            excl = s["profile"]["exclusive_ms"]
            parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(excl.items(), key=lambda kv: -kv[1]))
            syncs = ", ".join(f"{k} x{v['count']}" for k, v in s["profile"]["host_syncs"].items()) or "none"
            print(f"profile {name} {variant} stage {s['stage']} ({s['frames']} frames), ms: {parts}; host syncs: {syncs}")
    write_json(args.out, result)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    # The shared helpers (bench/common.py) import this checkout's package, so a child that runs another
    # checkout's code must not import them: the arguments are parsed here.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", action="append", help="a checkout whose code to run (repeatable; default this one)")
    parser.add_argument("--name", action="append", help="a name for each --code, in order")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=20, help="steps dropped at the start of each run")
    parser.add_argument("--profile-steps", type=int, default=100,
                        help="at most this many steps after the measured ones, in which one step per stage is "
                             "profiled (the fit stops once every stage has been; a rarely drawn stage needs more)")
    parser.add_argument("--repeats", type=int, default=2, help="fits of each (checkout, variant), taking turns")
    parser.add_argument("--step-repeats", type=int, default=7, help="repeats of the step benchmark (0: skip it)")
    parser.add_argument("--top", type=int, default=12, help="operators listed per profiled step")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="synthetic data folder (built on first use); default a folder under the system temp")
    parser.add_argument("--out", default="bench/results/fit_throughput.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (>= 1; CPU seconds need 1)")
    parser.add_argument("--quick", action="store_true", help="a smoke run (numbers not meaningful)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads < 1:
        raise ValueError(f"--threads={args.threads} is invalid; expected >= 1 (CPU seconds need one thread)")
    if args.quick and not args.child:
        args.resolution, args.batch, args.steps, args.warmup, args.profile_steps = 16, 2, 4, 2, 40
        args.repeats, args.step_repeats = 1, 1
        if args.out == parser.get_default("out"):  # a smoke run never replaces a measured result
            args.out = str(ROOT / "bench" / "results" / "quick" / Path(args.out).name)
    if args.data_root is None:
        args.data_root = Path(tempfile.gettempdir()) / f"tpdiff_fit_bench_{args.resolution}{'_quick' if args.quick else ''}"
    if args.child:
        child(args)
        return None
    return parent(args)


if __name__ == "__main__":
    main()
