"""Shared helpers of the benchmarks: machine facts, interleaved timing, FLOP counts, tables, JSON, plots.

Every benchmark builds its networks here, times variants with :func:`interleaved` (one repeat of each
variant in turn, so a burst of load from other processes hits all of them alike; medians are compared)
and writes one JSON through :func:`write_json`, which records the machine and the CPU load around the run.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so `python bench/x.py` finds the package and `tests.tiny_*` helpers
    sys.path.insert(0, str(ROOT))

from tpdiff_lightning.data.synthetic import read_manifest  # noqa: E402
from tpdiff_lightning.method.pyramid import TemporalPyramid  # noqa: E402
from tpdiff_lightning.models.dit import VideoDiT  # noqa: E402

TEXT_TOKENS = 8


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on, with the load average (other processes share this CPU)."""
    info: dict[str, Any] = {
        "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
        "torch": torch.__version__, "device": device, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def finish_machine_info(info: dict[str, Any]) -> dict[str, Any]:
    """Add the load average at the end of the run."""
    if hasattr(os, "getloadavg"):
        info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return info


def free_port() -> int:
    """A TCP port on the loopback address that nothing listens on now (for a spawned process group)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str = "cpu") -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call of ``fn`` (CUDA work included in the wall clock).

    With one torch thread the CPU seconds count only this process's work, so they hardly change when
    other processes load the machine; the wall clock does.
    """
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                device: str = "cpu") -> dict[str, dict[str, list[float]]]:
    """Time each variant ``repeats`` times, alternating variants (and their order) on every repeat.

    Returns ``{"wall": {variant: seconds per call}, "cpu": {variant: CPU seconds per call}}``; warm-up calls
    are not recorded.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} is invalid; expected at least 1")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, dict[str, list[float]]] = {"wall": {n: [] for n in fns}, "cpu": {n: [] for n in fns}}
    names = list(fns)
    for k in range(repeats):
        for name in (names if k % 2 == 0 else names[::-1]):
            wall, cpu = timed(fns[name], device)
            times["wall"][name].append(wall)
            times["cpu"][name].append(cpu)
    return times


def summary(times: Sequence[float]) -> dict[str, float]:
    """Median, min and the relative spread ``(max - min) / median`` of repeated timings (seconds)."""
    med = statistics.median(times)
    return {"median_s": med, "min_s": min(times), "spread": (max(times) - min(times)) / med if med else 0.0,
            "n": len(times)}


def ratio_stats(base: Sequence[float], new: Sequence[float]) -> dict[str, float]:
    """Speed-up ``base / new`` from medians, and the median of the per-repeat ratios (paired, same moment)."""
    paired = [b / n for b, n in zip(base, new)]
    return {"median_ratio": statistics.median(base) / statistics.median(new),
            "paired_median_ratio": statistics.median(paired), "paired_min": min(paired), "paired_max": max(paired)}


def build_dit(size: str = "dit-tiny", in_channels: int = 3, text_dim: int = 128, patch_size: int | None = None,
              seed: int = 0) -> VideoDiT:
    """The built-in DiT with a fixed seed (random weights; speed does not depend on them)."""
    torch.manual_seed(seed)
    return VideoDiT(in_channels, text_dim, size=size, patch_size=patch_size)


def random_text(batch: int, dim: int, tokens: int = TEXT_TOKENS, device: str = "cpu") -> tuple[Tensor, Tensor]:
    """Caption tokens ``(B, L, D)`` and an all-True mask ``(B, L)``, standing in for an encoder's output."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, tokens, dim, generator=g).to(device), torch.ones(batch, tokens, dtype=torch.bool, device=device)


def eval_split_urls(parser, data_root: Path) -> list[str]:
    """The shard URLs of a synthetic folder's eval split; a parser error naming ``--data-root`` when it has none."""
    manifest = read_manifest(data_root)
    if manifest is None or "eval" not in manifest.get("splits", {}):
        parser.error(f"--data-root {data_root}: expected synthetic shards with an eval split")
    return [str(data_root / s) for s in manifest["splits"]["eval"]["shards"]]


def model_clips(model, urls: Sequence[str], limit: int | None = None, batch_size: int = 16):
    """Yield ``(caption, video)`` of the clips in ``urls``, decoded at ``model``'s clip size, up to ``limit``."""
    from tpdiff_lightning.data.pipelines import eval_pipeline

    clip, seen = model.settings.clip, 0
    for batch in eval_pipeline(urls, clip.num_frames, clip.resolution, batch_size):
        for caption, video in zip(batch["caption"], batch["video"]):
            if limit is not None and seen >= limit:
                return
            yield caption, video
            seen += 1


def pyramid_from_config(overlays: Sequence[str | Path] = (), num_frames: int | None = None,
                        anchor_first_frame: bool | None = None) -> TemporalPyramid:
    """The pyramid that ``configs/default.yaml`` plus ``overlays`` describe (later files win)."""
    import yaml

    init = config_flags(overlays)
    data: dict[str, Any] = {}
    for path in [ROOT / "configs" / "default.yaml", *overlays]:
        cfg = yaml.safe_load(Path(path).read_text()) or {}
        data.update(((cfg.get("data") or {}).get("init_args")) or {})
    frames = num_frames or data.get("num_frames", 16)
    anchor = init.get("anchor_first_frame", False) if anchor_first_frame is None else anchor_first_frame
    return TemporalPyramid(init.get("schedule", "flow"), frames, init.get("num_stages", 3), init.get("reductions"),
                           init.get("partition"), anchor, init.get("stage_weights"),
                           spatial_reductions=init.get("spatial_reductions"))


def config_flags(overlays: Sequence[str | Path] = ()) -> dict[str, Any]:
    """The model's settings of the default config with the overlays applied, each group's fields side by side
    (``{"num_stages": 3, "schedule": "flow", ...}``; the clip shape, which the data sets, left out)."""
    import yaml

    from tpdiff_lightning.training.settings import GROUPS

    init: dict[str, Any] = {}
    for path in [ROOT / "configs" / "default.yaml", *overlays]:
        cfg = yaml.safe_load(Path(path).read_text()) or {}
        model = ((cfg.get("model") or {}).get("init_args")) or {}
        for group in GROUPS:
            if group != "clip":
                init.update(model.get(group) or {})
    return init


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs torch's counter attributes to one call of ``fn`` (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def set_gradient_checkpointing(backbone: nn.Module, on: bool) -> None:
    """Switch a backbone's gradient checkpointing: the built-in DiT's flag, or a diffusers model's own switch."""
    inner = getattr(backbone, "model", None)
    if hasattr(inner, "enable_gradient_checkpointing"):
        inner.enable_gradient_checkpointing() if on else inner.disable_gradient_checkpointing()
    elif hasattr(backbone, "gradient_checkpointing"):
        backbone.gradient_checkpointing = on


def train_step_flops(build_module: Callable[[], nn.Module], x_shape: Sequence[int], captions: Sequence[str] | Tensor,
                     stage: int, gradient_checkpointing: bool = False) -> float:
    """FLOPs of one training step's forward and backward at ``stage``.

    The denoiser is counted on the ``meta`` device, where no memory is taken, so a full-size step (DiT-L at 16k
    tokens holds ~170 GiB of float32 activations) is counted on any machine; ``build_module()`` builds the
    TPDiffModule on the host and it is moved there. A trainable text encoder is counted on the host (it is small),
    on ``captions``; given caption embeddings ``(B, L, D)`` instead, there is none to count. Alignment (a B x B cost
    on the host) is left out. ``gradient_checkpointing`` counts the recomputed forward too: hardware FLOPs, where
    ``False`` gives the model FLOPs."""
    module = build_module()
    text_flops = 0.0
    if isinstance(captions, Tensor):
        text_shape = tuple(captions.shape)
    else:
        trainable = any(p.requires_grad for p in module.text_encoder.parameters())
        with torch.set_grad_enabled(trainable):
            text_flops = count_flops(lambda: module.text_encoder(list(captions))[0].float().sum().backward()
                                     if trainable else module.text_encoder(list(captions)))
            text_shape = tuple(module.text_encoder(list(captions))[0].shape)
    module = module.to("meta")
    settings = module.settings  # the Hungarian step runs on the host; its FLOPs are negligible
    module.settings = replace(settings, objective=replace(settings.objective, alignment=False))
    set_gradient_checkpointing(module.backbone, gradient_checkpointing)
    x0 = torch.zeros(tuple(x_shape), device="meta")
    text = torch.zeros(text_shape, device="meta")
    mask = torch.ones(text_shape[:2], dtype=torch.bool, device="meta")
    return text_flops + count_flops(lambda: module.stage_loss(x0, text, mask, stage).backward())


def sampling_flops(forward: Callable[[Tensor, int], Any], pyramid: TemporalPyramid, steps: Sequence[int],
                   batch: int, frame_shape: Sequence[int], device: str = "cpu") -> dict[str, Any]:
    """FLOPs of a whole sampling pass: one counted forward per stage, times the stage's steps.

    Args:
        forward: ``(x (B, C, F_i, H / P_i, W / P_i), stride) -> prediction``; in a spatio-temporal pyramid a stage
            with ``P_i > 1`` calls ``forward(x, stride, spatial_stride)``.
        steps: steps per stage.
        frame_shape: ``(C, H, W)`` at full resolution.
    """
    C, H, W = frame_shape
    per_stage = []
    for stage in pyramid.stages:
        x = torch.zeros(batch, C, stage.num_frames, *pyramid.stage_size(H, W, stage.index), device=device)
        strides = (stage.stride,) if stage.spatial_stride == 1 else (stage.stride, stage.spatial_stride)
        with torch.no_grad():
            per_stage.append(count_flops(lambda: forward(x, *strides)))
    return {"per_forward": per_stage, "total": sum(f * n for f, n in zip(per_stage, steps))}


def fmt_row(cells: Sequence[Any], widths: Sequence[int]) -> str:
    out = []
    for cell, w in zip(cells, widths):
        text = f"{cell:.3f}" if isinstance(cell, float) else str(cell)
        out.append(text.rjust(w) if out else text.ljust(w))
    return " ".join(out)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Print (and return) a plain aligned table; floats get 3 decimals."""
    cells = [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    text = "\n".join(fmt_row(r, widths) for r in cells)
    print(text)
    return text


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The same rows as a Markdown table."""
    def cell(c: Any) -> str:
        return f"{c:.3f}" if isinstance(c, float) else str(c)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def parse_bench_args(parser, argv: list[str] | None = None):
    """Parse a benchmark's arguments. A ``--quick`` run writes its JSON (and plot) to ``bench/results/quick/``
    unless ``--out``/``--plot`` are given, so a smoke run never replaces a measured result."""
    args = parser.parse_args(argv)
    if getattr(args, "quick", False):
        for dest in ("out", "plot"):
            value = getattr(args, dest, None)
            if value and value == parser.get_default(dest):
                setattr(args, dest, str(ROOT / "bench" / "results" / "quick" / Path(value).name))
    return args


def write_json(path: str | Path, result: dict[str, Any], quiet: bool = False) -> Path:
    """Write ``result`` (finite floats only, keys sorted as given) through a temporary file and a rename, so a run
    stopped mid-write leaves the previous file; say where unless ``quiet``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    temp.replace(path)
    if not quiet:
        print(f"wrote {path}")
    return path


def set_threads(threads: int) -> None:
    """Set torch's CPU threads; 0 keeps torch's choice."""
    if threads < 0:
        raise ValueError(f"threads={threads} is invalid; expected 0 (torch's choice) or a positive count")
    if threads:
        torch.set_num_threads(threads)


def headline_clock(device: str) -> str:
    """Which timing the headline ratios use: CPU seconds on CPU (robust to other processes), wall on GPU."""
    return "wall" if device.startswith("cuda") else "cpu"


def add_sampling_args(parser, repeats: int) -> None:
    """The DiT, clip and sampling arguments of the sampling benchmarks (defaults: the default config's)."""
    parser.add_argument("--size", default="dit-tiny")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--text-dim", type=int, default=128)


def add_common_args(parser) -> None:
    """Arguments every benchmark takes."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 (default) makes CPU seconds immune to other processes' load, "
                             "0 keeps torch's choice")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds (numbers not meaningful)")


def parameter_storages(module: nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _axis_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    return [lo + (hi - lo) * k / (n - 1) for k in range(n)]


def line_plot(path: str | Path, panels: dict[str, dict[str, tuple[Sequence[float], Sequence[float]]]],
              xlabel: str, ylabel: str, size: tuple[int, int] = (560, 400)) -> Path:
    """A PNG of line charts side by side (one per panel), drawn with Pillow: ``panels[title][series] = (xs, ys)``."""
    from PIL import Image, ImageDraw

    W, H = size
    img = Image.new("RGB", (W * len(panels), H), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 70, 20, 30, 60
    for k, (title, series) in enumerate(panels.items()):
        ox = k * W
        xs = [x for xs_, _ in series.values() for x in xs_] or [0.0, 1.0]
        ys = [y for _, ys_ in series.values() for y in ys_] or [0.0, 1.0]
        x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
        pad = 0.05 * (y1 - y0)
        y0, y1 = y0 - pad, y1 + pad

        def px(x: float, y: float) -> tuple[float, float]:
            return (ox + left + (x - x0) / (x1 - x0) * (W - left - right),
                    top + (1 - (y - y0) / (y1 - y0)) * (H - top - bottom))

        draw.rectangle([ox + left, top, ox + W - right, H - bottom], outline="black")
        for t in _axis_ticks(x0, x1):
            x, _ = px(t, y0)
            draw.line([x, H - bottom, x, H - bottom + 4], fill="black")
            draw.text((x - 12, H - bottom + 6), f"{t:.3g}", fill="black")
        for t in _axis_ticks(y0, y1):
            _, y = px(x0, t)
            draw.line([ox + left - 4, y, ox + left, y], fill="black")
            draw.text((ox + 8, y - 5), f"{t:.4g}", fill="black")
        draw.text((ox + left, 8), title, fill="black")
        draw.text((ox + W // 2 - 60, H - 22), xlabel, fill="black")
        draw.text((ox + 8, top - 14), ylabel, fill="black")
        for j, (name, (sx, sy)) in enumerate(series.items()):
            colour = COLOURS[j % len(COLOURS)]
            pts = [px(x, y) for x, y in zip(sx, sy)]
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=2)
            for x, y in pts:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
            draw.text((ox + W - right - 170, top + 6 + 12 * j), name, fill=colour)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def bar_plot(path: str | Path, groups: Sequence[str], series: dict[str, Sequence[float]], ylabel: str,
             size: tuple[int, int] = (900, 380)) -> Path:
    """A PNG of grouped bars drawn with Pillow: one group per label, one bar per series."""
    from PIL import Image, ImageDraw

    W, H = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, 20, 40, 70
    y1 = max(max(v) for v in series.values()) * 1.1
    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    for t in _axis_ticks(0.0, y1):
        y = top + (1 - t / y1) * (H - top - bottom)
        draw.line([left - 4, y, W - right, y], fill=(220, 220, 220))
        draw.text((8, y - 5), f"{t:.2f}", fill="black")
    gw = (W - left - right) / len(groups)
    bw = gw * 0.8 / len(series)
    for g, label in enumerate(groups):
        gx = left + g * gw + gw * 0.1
        for j, (name, values) in enumerate(series.items()):
            y = top + (1 - values[g] / y1) * (H - top - bottom)
            draw.rectangle([gx + j * bw, y, gx + (j + 1) * bw - 2, H - bottom], fill=COLOURS[j % len(COLOURS)])
        draw.text((gx, H - bottom + 6 + 12 * (g % 2)), label, fill="black")
    for j, name in enumerate(series):
        draw.rectangle([left + 10 + 170 * j, 12, left + 20 + 170 * j, 22], fill=COLOURS[j % len(COLOURS)])
        draw.text((left + 24 + 170 * j, 11), name, fill="black")
    draw.text((8, H - 20), ylabel, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def full_rate_tokens(resolution: int, frames: int | None = None) -> int:
    """Tokens of one clip at the full rate in the default config's backbone (patch from the config), at
    ``frames`` frames (default: the config's ``num_frames``)."""
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    frames = frames or cfg["data"]["init_args"]["num_frames"]
    from tpdiff_lightning.models.dit import DIT_SIZES

    backbone = cfg["model"]["init_args"]["backbone"]["init_args"]
    patch = backbone.get("patch_size") or DIT_SIZES[backbone.get("size", "dit-tiny")].patch
    return frames * (resolution // patch) ** 2
