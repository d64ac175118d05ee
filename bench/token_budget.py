"""Stage-aware token-budget batches against fixed batches in the real training loop, TPDiff and vanilla.

    python bench/token_budget.py              # default config, 16x32x32, batch 16, 60 measured steps per run
    python bench/token_budget.py --quick      # a smoke run of the TPDiff pair only (numbers not meaningful)

Four real ``lightning_cli.py fit`` runs of ``configs/default.yaml`` in child processes (one torch thread, data
in the main process, checkpoints, sampling, FVD and validation off), taking turns ``--repeats`` times:

- ``fixed``: ``batch_size`` clips per batch at every stage (the default);
- ``token budget``: ``data.init_args.token_budget`` = the tokens of ``batch_size`` clips at the full rate, with
  ``stage_aware_batches`` (the stage drawn before the batch, each stage's batch filled to the budget, the draw
  corrected so each stage keeps its weight of training clips);

each for TPDiff and for vanilla (``configs/vanilla.yaml``, one stage: the budget changes nothing but the path).
Clips/s and tokens/s come from the run's own ``ClipThroughput`` TensorBoard points after ``--warmup`` steps, on
the wall clock; a run's share of clips per stage from its ``train/stage`` and ``data/clips_per_step`` logs.
Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, full_rate_tokens, machine_info, parse_bench_args, print_table, write_json

VARIANTS = {("tpdiff", "fixed"): [], ("tpdiff", "token budget"): ["budget"],
            ("vanilla", "fixed"): ["vanilla"], ("vanilla", "token budget"): ["vanilla", "budget"]}


def fit(tags: list[str], args: argparse.Namespace, data: Path, out: Path) -> dict[str, Any]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    callbacks = [{"class_path": "tpdiff_lightning.callbacks.throughput.ClipThroughput",
                  "init_args": {"every_n_batches": 1}}]
    steps = args.warmup + args.steps
    cmd = [sys.executable, "lightning_cli.py", "fit", "--config", "configs/default.yaml",
           *(["--config", "configs/vanilla.yaml"] if "vanilla" in tags else []),
           f"--trainer.max_steps={steps}", f"--trainer.callbacks={json.dumps(callbacks)}",
           "--trainer.limit_val_batches=0", "--trainer.enable_checkpointing=false",
           "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1",
           f"--trainer.logger.init_args.save_dir={out}", f"--data.init_args.root={data}",
           f"--data.init_args.resolution={args.resolution}", f"--data.init_args.batch_size={args.batch}",
           "--data.init_args.num_workers=0", f"--data.init_args.train_steps_per_epoch={steps + 10}",
           "--data.init_args.build_synthetic=false"]  # the shards written here, not a rebuild at the config's size
    if "budget" in tags:
        cmd.append(f"--data.init_args.token_budget={args.batch * full_rate_tokens(args.resolution, args.frames)}")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"fit {tags} failed:\n{proc.stderr[-3000:]}")
    run = next(out.rglob("events.out.tfevents.*")).parent
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()

    def after_warmup(tag: str) -> list[float]:
        tags_here = events.Tags()["scalars"]
        return [e.value for e in events.Scalars(tag) if e.step >= args.warmup] if tag in tags_here else []
    clips_per_s = after_warmup("data/clips_per_s")
    stages = {e.step: int(e.value) for e in events.Scalars("train/stage")}
    sizes = {e.step: e.value for e in events.Scalars("data/clips_per_step")} if "budget" in tags else {}
    clips_by_stage = [0.0] * (max(stages.values()) + 1)
    for step, stage in stages.items():
        clips_by_stage[stage] += sizes.get(step, args.batch)
    total = sum(clips_by_stage)
    return {"clips_per_s": sum(clips_per_s) / len(clips_per_s),
            "tokens_per_s": (sum(v := after_warmup("data/tokens_per_s")) / len(v)) if "budget" in tags else None,
            "clip_share_by_stage": [c / total for c in clips_by_stage], "wall_s": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a smoke run (numbers not meaningful)")
    parser.add_argument("--out", default="bench/results/token_budget.json")
    args = parse_bench_args(parser, argv)
    if args.quick:
        args.resolution, args.batch, args.steps, args.warmup, args.repeats = 16, 2, 6, 2, 1
    variants = {k: v for k, v in VARIANTS.items() if k[0] == "tpdiff"} if args.quick else VARIANTS
    runs: dict[tuple[str, str], list[dict]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        from tpdiff_lightning.data.synthetic import write_synthetic_shards

        data = Path(tmp) / "data"
        write_synthetic_shards(data, num_train=64 if args.quick else 512, num_eval=4, num_frames=args.frames,
                               size=args.resolution, progress=False)
        for repeat in range(args.repeats):  # the four runs take turns
            for key, tags in variants.items():
                runs[key].append(fit(tags, args, data, Path(tmp) / f"{'-'.join(key)}-{repeat}".replace(" ", "_")))
    rows = []
    for (variant, batches), measured in runs.items():
        rate = sum(r["clips_per_s"] for r in measured) / len(measured)
        shares = [sum(s) / len(measured) for s in zip(*(r["clip_share_by_stage"] for r in measured))]
        rows.append({"variant": variant, "batches": batches, "clips_per_s": rate,
                     "tokens_per_s": measured[0]["tokens_per_s"] and
                     sum(r["tokens_per_s"] for r in measured) / len(measured),
                     "clip_share_by_stage": shares, "runs": measured})
    by = {(r["variant"], r["batches"]): r for r in rows}
    ratios = {b: by[("tpdiff", b)]["clips_per_s"] / by[("vanilla", b)]["clips_per_s"]
              for b in ("fixed", "token budget") if ("vanilla", b) in by}
    print_table(["variant", "batches", "clips/s", "tokens/s", "clip share by stage", "TPDiff / vanilla"],
                [[r["variant"], r["batches"], f"{r['clips_per_s']:.2f}",
                  f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-",
                  " / ".join(f"{s:.2f}" for s in r["clip_share_by_stage"]),
                  f"{ratios[r['batches']]:.2f}x" if r["variant"] == "tpdiff" and ratios else ""] for r in rows])
    result = {"machine": machine_info("cpu"), "args": vars(args), "rows": rows, "tpdiff_over_vanilla": ratios,
              "token_budget_over_fixed_tpdiff": by[("tpdiff", "token budget")]["clips_per_s"]
              / by[("tpdiff", "fixed")]["clips_per_s"]}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
