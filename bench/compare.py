"""Compare two benchmark JSONs (an old run and a new one): print the ratio of every tracked number, flag regressions.

    python bench/compare.py old.json new.json                  # exit code 1 when something regressed
    python bench/compare.py old.json new.json --tolerance 0.15

Tracked numbers are the speed-ups and overheads each benchmark reports (see ``METRICS``); for a speed-up
higher is better, for a time or an overhead lower is better. A change beyond ``--tolerance`` (relative) in
the bad direction is a regression. Timings on a shared CPU vary by 10-20%, so the default is 0.15.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterator

# Per benchmark: (label, path into the JSON, higher_is_better). A path element "*" walks a list, naming
# each entry by its "name"/"backbone"/"shape"+"batch" key.
METRICS: dict[str, list[tuple[str, tuple[str, ...], bool]]] = {
    "inference_latency": [("speed-up", ("results", "*", "speedup"), True),
                          ("FLOP-predicted speed-up", ("results", "*", "flop_predicted_speedup"), True)],
    "train_throughput": [("samples/s speed-up", ("speedup_samples_per_s",), True),
                         ("vanilla step s", ("vanilla_step_s",), False),
                         ("expected TPDiff step s", ("expected_tpdiff_step_s",), False)],
    "alignment_overhead": [("per-step ms", ("cases", "*", "per_step_ms"), False)],
    "ablations": [("inference speed-up", ("rows", "*", "infer_speedup"), True),
                  ("train compute ratio", ("rows", "*", "train_compute_ratio"), True)],
    "convergence": [],
}


def entry_name(entry: dict[str, Any]) -> str:
    if "name" in entry:
        return str(entry["name"])
    if "backbone" in entry:
        return str(entry["backbone"])
    if "shape" in entry and "batch" in entry:
        return f"{entry['shape']}@{entry['batch']}"
    raise ValueError(f"cannot name list entry with keys {sorted(entry)}; expected name, backbone or shape+batch")


def walk(data: Any, path: tuple[str, ...], prefix: str = "") -> Iterator[tuple[str, float]]:
    """Yield ``(name, value)`` for every number the path reaches."""
    if not path:
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            yield prefix, float(data)
        return
    head, rest = path[0], path[1:]
    if head == "*":
        for entry in data:
            yield from walk(entry, rest, f"{prefix}[{entry_name(entry)}]")
    elif isinstance(data, dict) and head in data:
        yield from walk(data[head], rest, prefix)


def compare(old: dict[str, Any], new: dict[str, Any], tolerance: float) -> list[dict[str, Any]]:
    """One row per tracked number present in both: old, new, ratio new/old and whether it regressed."""
    if old.get("bench") != new.get("bench"):
        raise ValueError(f"old is a {old.get('bench')!r} result and new a {new.get('bench')!r} one; expected the same bench")
    bench = new.get("bench")
    if bench not in METRICS:
        raise ValueError(f"unknown bench {bench!r}; expected one of {sorted(METRICS)}")
    rows = []
    for label, path, higher in METRICS[bench]:
        old_vals = dict(walk(old, path))
        for name, value in walk(new, path):
            if name not in old_vals or old_vals[name] == 0:
                continue
            ratio = value / old_vals[name]
            worse = ratio < 1 - tolerance if higher else ratio > 1 + tolerance
            rows.append({"metric": f"{label}{name}", "old": old_vals[name], "new": value, "ratio": ratio,
                         "higher_is_better": higher, "regression": worse})
    return rows


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Settings two benchmark results were run with that differ (``out`` and ``plot`` paths aside)."""
    old_cfg, new_cfg = old.get("config", {}), new.get("config", {})
    return {k: (old_cfg.get(k), new_cfg.get(k)) for k in sorted(set(old_cfg) | set(new_cfg))
            if k not in ("out", "plot") and old_cfg.get(k) != new_cfg.get(k)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--tolerance", type=float, default=0.15)
    parser.add_argument("--json", default=None, help="also write the comparison here")
    args = parser.parse_args(argv)
    if not 0 <= args.tolerance < 1:
        raise ValueError(f"--tolerance={args.tolerance} is invalid; expected 0 <= tolerance < 1")
    old, new = json.loads(Path(args.old).read_text()), json.loads(Path(args.new).read_text())
    differences = config_differences(old, new)
    if differences:
        print("warning: the two runs used different settings, so their numbers may not be comparable: "
              + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in differences.items()))
    rows = compare(old, new, args.tolerance)
    width = max([len(r["metric"]) for r in rows] + [6])
    print(f"{'metric'.ljust(width)} {'old':>10} {'new':>10} {'new/old':>8}")
    for r in rows:
        flag = "  REGRESSION" if r["regression"] else ""
        print(f"{r['metric'].ljust(width)} {r['old']:10.4g} {r['new']:10.4g} {r['ratio']:8.3f}{flag}")
    regressions = sum(r["regression"] for r in rows)
    print(f"{len(rows)} numbers compared, {regressions} regression(s) beyond {args.tolerance:.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "regressions": regressions,
                                               "config_differences": differences}, indent=2) + "\n")
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
