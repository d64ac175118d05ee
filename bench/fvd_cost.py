"""What FVD costs: I3D clips/s on this machine, the FVD-eval share of a finished run's compute, and a
FLOP projection of that share for full-size configs.

    python bench/fvd_cost.py                                   # I3D speed only
    python bench/fvd_cost.py --run outputs/synthetic/tpdiff-flow   # plus the overhead measured in that run
    python bench/fvd_cost.py --project configs/animatediff_ddim.yaml --project configs/wan_lora_flow.yaml
    python bench/fvd_cost.py --quick

The measured overhead is read from the run's TensorBoard scalars that ``FVDCurve`` writes:
``compute/fvd_eval_hours`` against ``compute/gpu_hours`` (training, evaluation excluded).

The projection (``--project``) is NOT a measurement. It counts FLOPs with ``FlopCounterMode`` on models
built on the meta device from full-size public architecture configs (no weights), and assumes training
and evaluation run at the same hardware utilisation. Evaluation samples one clip at a time (batch 1 per
caption, plus the I3D and VAE passes), which usually runs at lower utilisation than training, so the real
overhead is likely higher than projected.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from common import parse_bench_args
from tpdiff_lightning.method.pyramid import TemporalPyramid
from tpdiff_lightning.method.sampling import split_steps
from tpdiff_lightning.metrics.i3d import INPUT_SIZE, MIN_FRAMES, InceptionI3d, i3d_features, load_i3d

REPO = Path(__file__).resolve().parents[1]
TARGET = 0.10  # the target: FVD evaluation at most 10% of training at the default interval


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


# ---------------------------------------------------------------------------------------------------------
# FLOP projection for full-size configs (no weights: models are built on the meta device).
# ---------------------------------------------------------------------------------------------------------

# Public architecture configs, written out so that no weight folder is needed.
# SD1.5 UNet (runwayml/stable-diffusion-v1-5 unet/config.json) with AnimateDiff v1.5-2 motion modules
# (guoyww/animatediff-motion-adapter-v1-5-2: 8 heads, max 32 frames, a motion mid block), as the
# diffusers ``UNetMotionModel`` that ``UNetMotionModel.from_unet2d`` builds from the two.
SD15_ANIMATEDIFF_UNET: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlockMotion",) * 3 + ("DownBlockMotion",),
    "up_block_types": ("UpBlockMotion",) + ("CrossAttnUpBlockMotion",) * 3,
    "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 768, "num_attention_heads": 8,  # SD1.5's attention_head_dim 8 (really a head count)
    "use_linear_projection": False, "motion_max_seq_length": 32, "motion_num_attention_heads": 8,
    "use_motion_mid_block": True,
}
# SD1.5 VAE (runwayml/stable-diffusion-v1-5 vae/config.json), diffusers ``AutoencoderKL``.
SD15_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2, "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32, "sample_size": 512,
    "scaling_factor": 0.18215,
}
# Wan2.1-T2V-1.3B transformer (Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json).
WAN21_T2V_1_3B: dict[str, Any] = {
    "patch_size": (1, 2, 2), "num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16,
    "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024,
}
# Wan2.1 VAE: diffusers' ``AutoencoderKLWan`` defaults are the released config (base_dim 96, z_dim 16).
WAN_VAE: dict[str, Any] = {"base_dim": 96, "z_dim": 16}
# SD1.5's text encoder, CLIP ViT-L/14 text tower (transformers ``CLIPTextConfig``).
CLIP_L_TEXT: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
}
# Wan2.1's text encoder, UMT5-XXL's encoder (transformers ``UMT5Config``).
UMT5_XXL: dict[str, Any] = {
    "vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu", "is_encoder_decoder": False,
}

METHOD = (
    "FLOP projection, not a measurement: FLOPs counted with torch.utils.flop_counter.FlopCounterMode on models "
    "built on the meta device from the full-size public architecture configs written out in bench/fvd_cost.py "
    "(no weights). Overhead = eval FLOPs per FVD point / (every_n_steps x training FLOPs per optimizer step), "
    "which equals the share of training time only if training and evaluation run at equal hardware utilisation. "
    "Evaluation samples one clip at a time (batch 1, the CFG branches as separate forwards) and runs the VAE "
    "decoder and I3D, which typically reach lower utilisation than batched bf16 training, so the real overhead "
    "is likely higher than projected. Training FLOPs per step = global batch x (backward_factor x E_stage[forward] "
    "+ VAE encode + text encoder), backward_factor 3 (forward + backward); gradient checkpointing's recomputed "
    "forward (+1x) and the missing weight gradients of frozen weights (LoRA, motion-only) are not modelled. "
    "'latent_cache' drops the VAE encode and text encoder from training. Eval FLOPs per point = num_videos x "
    "(sum over stages of steps x cfg_factor x forward at that stage's frames + text encoder calls + VAE decode "
    "+ I3D on the clip's frames at 224x224); the real-data I3D statistics are cached, so only generated clips count."
)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn()`` (a multiply-add is 2 FLOPs) as ``FlopCounterMode`` counts them; works on meta tensors."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config_chain(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A YAML config merged over the configs its usage line (``# python lightning_cli.py fit --config A
    --config B``) names before it, recursively, as ``--config A --config B`` would compose them (later wins)."""
    path = Path(path)
    if not path.is_absolute() and not path.is_file():
        path = REPO / path
    if not path.is_file():
        raise FileNotFoundError(f"config {str(path)!r} does not exist; expected a YAML file under configs/")
    path = path.resolve()
    text = path.read_text()
    usage = next((line for line in text.splitlines() if line.startswith("#") and "--config" in line), "")
    chain = [(REPO / p).resolve() for p in re.findall(r"--config\s+(\S+\.ya?ml)", usage)]
    merged: dict = {}
    if path in chain:
        for parent in chain[: chain.index(path)]:
            if parent not in _seen and parent.is_file():
                merged = _deep_merge(merged, load_config_chain(parent, _seen + (path,)))
    return _deep_merge(merged, yaml.safe_load(text) or {})


def _class_name(spec: dict | None) -> str:
    return str((spec or {}).get("class_path", "")).rsplit(".", 1)[-1]


def _callback(cfg: dict, name: str) -> dict | None:
    for cb in cfg.get("trainer", {}).get("callbacks") or []:
        if _class_name(cb) == name:
            return cb.get("init_args", {}) or {}
    return None


def read_projection_settings(cfg: dict) -> dict:
    """The settings the projection needs, from a composed config (module defaults where a key is absent)."""
    trainer, model = cfg.get("trainer", {}), cfg.get("model", {}).get("init_args", {})
    data = cfg.get("data", {}).get("init_args", {})
    fvd = _callback(cfg, "FVDCurve")
    if fvd is None:
        raise ValueError("the config has no tpdiff_lightning.callbacks.fvd_curve.FVDCurve callback; expected one "
                         "to project its evaluation cost")
    devices = trainer.get("devices", 1)
    notes = []
    if isinstance(devices, (list, tuple)):
        devices = len(devices)
    elif not isinstance(devices, int) or devices < 1:
        notes.append(f"trainer.devices={devices!r} counted as 1 device")
        devices = 1
    resolution = data.get("resolution", 256)
    height, width = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    pyramid, objective = model.get("pyramid") or {}, model.get("objective") or {}
    sampling = model.get("sampling") or {}
    sample_steps = sampling.get("steps", 30)
    return {
        "backbone": model.get("backbone", {}), "codec": model.get("codec"), "text_encoder": model.get("text_encoder"),
        "num_frames": int(data.get("num_frames", 16)), "height": int(height), "width": int(width),
        "batch_size": int(data.get("batch_size", 1)), "devices": int(devices),
        "num_nodes": int(trainer.get("num_nodes", 1) or 1),
        "accumulate_grad_batches": int(trainer.get("accumulate_grad_batches", 1) or 1),
        "latent_cache": data.get("sample_format", "video") == "latent",
        "schedule": objective.get("schedule", "flow"), "num_stages": int(pyramid.get("num_stages", 3)),
        "reductions": pyramid.get("reductions"), "partition": pyramid.get("partition"),
        "spatial_reductions": pyramid.get("spatial_reductions"), "stage_weights": pyramid.get("stage_weights"),
        "anchor_first_frame": bool(pyramid.get("anchor_first_frame", False)),
        "guidance_scale": float(sampling.get("guidance_scale", 1.0)),
        "num_videos": int(fvd.get("num_videos", 16)), "every_n_steps": int(fvd.get("every_n_steps", 500)),
        "num_steps": int(fvd.get("num_steps") or sample_steps), "notes": notes,
    }


def _lora(init_args: dict):
    from tpdiff_lightning.models.lora import LoraSettings

    spec = init_args.get("lora")
    return None if spec is None else LoraSettings(**spec)


def build_meta_parts(settings: dict) -> dict:
    """Full-size codec, backbone and text encoder on the meta device (no weights read, no memory used).

    Returns ``{"codec", "backbone", "text": (model, tokens) or None, "text_note", "architectures"}``."""
    backbone_name, codec_name = _class_name(settings["backbone"]), _class_name(settings["codec"])
    text_name = _class_name(settings["text_encoder"])
    b_args = dict(settings["backbone"].get("init_args", {}) or {})
    t_args = dict((settings["text_encoder"] or {}).get("init_args", {}) or {})
    arch: dict[str, str] = {}
    with torch.device("meta"):
        if codec_name == "SDVAECodec":
            from tpdiff_lightning.models.vae import SDVAECodec
            codec = SDVAECodec(config=SD15_VAE)
            arch["codec"] = "SD1.5 AutoencoderKL"
        elif codec_name == "WanVAECodec":
            from tpdiff_lightning.models.vae import WanVAECodec
            codec = WanVAECodec(config=WAN_VAE)
            arch["codec"] = "Wan2.1 AutoencoderKLWan"
        else:
            raise ValueError(f"codec {codec_name or None!r} has no full-size config here; expected SDVAECodec or "
                             "WanVAECodec (the projection is for the pretrained-backbone configs)")
        if text_name == "CLIPTextEncoder":
            from transformers import CLIPTextConfig, CLIPTextModel
            text = (CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)), int(t_args.get("max_length", 77)))
            text_dim, arch["text_encoder"] = CLIP_L_TEXT["hidden_size"], "CLIP ViT-L/14 text"
        elif text_name == "UMT5TextEncoder":
            from transformers import UMT5Config, UMT5EncoderModel
            text = (UMT5EncoderModel(UMT5Config(**UMT5_XXL)), int(t_args.get("max_length", 512)))
            text_dim, arch["text_encoder"] = UMT5_XXL["d_model"], "UMT5-XXL encoder"
        else:
            raise ValueError(f"text encoder {text_name or None!r} has no full-size config here; expected "
                             "CLIPTextEncoder or UMT5TextEncoder")
        channels = codec.latent_channels
        if backbone_name == "AnimateDiffBackbone":
            from tpdiff_lightning.models.animatediff import AnimateDiffBackbone
            backbone = AnimateDiffBackbone(channels, text_dim, config=SD15_ANIMATEDIFF_UNET,
                                           train_mode=b_args.get("train_mode", "full"), lora=_lora(b_args))
            arch["backbone"] = "SD1.5 UNet + AnimateDiff v1.5-2 motion modules (UNetMotionModel)"
        elif backbone_name == "WanBackbone":
            from tpdiff_lightning.models.wan import WanBackbone
            backbone = WanBackbone(channels, text_dim, config=WAN21_T2V_1_3B, lora=_lora(b_args),
                                   text_length=b_args.get("text_length"))
            arch["backbone"] = "Wan2.1-T2V-1.3B WanTransformer3DModel"
        else:
            raise ValueError(f"backbone {backbone_name or None!r} has no full-size config here; expected "
                             "AnimateDiffBackbone or WanBackbone")
        if b_args.get("lora"):
            arch["backbone"] += f" + LoRA r={b_args['lora'].get('rank', 128)}"
    return {"codec": codec, "backbone": backbone, "text": text, "text_dim": text_dim, "architectures": arch}


def stage_forward_flops(backbone: nn.Module, channels: int, text_dim: int, text_tokens: int, height: int,
                        width: int) -> Callable[[int, int], int]:
    """``flops(frames, stride, spatial_stride=1)``: forward FLOPs of ``backbone`` on one clip
    ``(1, C, frames, height / P, width / P)`` with ``(1, text_tokens, text_dim)`` captions, counted on meta
    tensors (memoised)."""
    device = next(backbone.parameters()).device
    cache: dict[tuple[int, int, int], int] = {}

    def flops(frames: int, stride: int, spatial_stride: int = 1) -> int:
        key = (frames, stride, spatial_stride)
        if key not in cache:
            x = torch.empty(1, channels, frames, height // spatial_stride, width // spatial_stride, device=device)
            t = torch.full((1,), 500.0, device=device)
            text = torch.empty(1, text_tokens, text_dim, device=device)
            mask = torch.ones(1, text_tokens, dtype=torch.bool, device=device)
            strides = {"stride": stride} if spatial_stride == 1 else {"stride": stride, "spatial_stride": spatial_stride}
            with torch.no_grad():
                cache[key] = count_flops(lambda: backbone(x, t, text, mask, **strides))
        return cache[key]

    return flops


def project_overhead(pyramid: TemporalPyramid, forward_flops: Callable[[int, int], float], *, global_batch: int,
                     num_videos: int, every_n_steps: int, num_steps: int, guidance_scale: float = 1.0,
                     encode_flops: float = 0.0, decode_flops: float = 0.0, text_flops: float = 0.0,
                     i3d_flops: float = 0.0, backward_factor: float = 3.0, target: float = TARGET) -> dict:
    """Training FLOPs per optimizer step, eval FLOPs per FVD point, and their ratio.

    Args:
        pyramid: the config's pyramid over latent frames (K = 1 for vanilla).
        forward_flops: ``(frames, stride) -> FLOPs`` of one denoiser forward on one clip; a stage of a
            spatio-temporal pyramid calls it as ``(frames, stride, spatial_stride)``.
        global_batch: clips per optimizer step (batch x devices x nodes x accumulation).
        num_videos: generated clips per FVD point; every_n_steps: optimizer steps between points.
        num_steps: sampling steps per clip, split over stages as the sampler does (``split_steps``).
        guidance_scale: CFG weight; anything but 1 runs the denoiser twice per step (and the text encoder twice).
        encode_flops, decode_flops, text_flops, i3d_flops: per clip (text: per caption).
        backward_factor: training FLOPs per forward FLOP (3: forward + backward).
    Returns: a dict of FLOP counts (``train_*`` per step, ``eval_*`` per point), ``overhead`` (pixel input, the
    VAE encode in the step) and ``overhead_latent_cache``, and the ``every_n_steps`` bringing each to ``target``.
    """
    if min(global_batch, num_videos, every_n_steps, num_steps) < 1:
        raise ValueError(f"global_batch={global_batch}, num_videos={num_videos}, every_n_steps={every_n_steps}, "
                         f"num_steps={num_steps}; expected all >= 1")
    cfg_factor = 1 if guidance_scale == 1.0 else 2
    weights = [w / sum(pyramid.stage_weights) for w in pyramid.stage_weights]
    steps = split_steps(num_steps, pyramid.partition)
    stages = [{"stage": s.index, "latent_frames": s.num_frames, "stride": s.stride,
               "spatial_stride": s.spatial_stride, "train_weight": w,
               "sample_steps": n,
               "forward_flops": float(forward_flops(s.num_frames, s.stride, *([s.spatial_stride] if s.spatial_stride > 1 else [])))}
              for s, w, n in zip(pyramid.stages, weights, steps)]
    full = stages[-1]["forward_flops"] if pyramid.stages[-1].stride == 1 else float(forward_flops(pyramid.num_frames, 1))
    denoiser_train = global_batch * backward_factor * sum(s["train_weight"] * s["forward_flops"] for s in stages)
    inputs_train = global_batch * (encode_flops + text_flops)
    eval_denoiser = num_videos * cfg_factor * sum(s["sample_steps"] * s["forward_flops"] for s in stages)
    eval_text, eval_decode, eval_i3d = (num_videos * cfg_factor * text_flops, num_videos * decode_flops,
                                        num_videos * i3d_flops)
    eval_total = eval_denoiser + eval_text + eval_decode + eval_i3d
    train_pixels, train_cache = denoiser_train + inputs_train, denoiser_train

    def interval(train_step: float) -> int:
        return math.ceil(eval_total / (target * train_step))

    return {
        "stages": stages, "full_rate_forward_flops": full, "cfg_factor": cfg_factor, "global_batch": global_batch,
        "num_videos": num_videos, "every_n_steps": every_n_steps, "num_steps": num_steps,
        "train_flops_per_step": train_pixels, "train_flops_per_step_latent_cache": train_cache,
        "train_denoiser_flops_per_step": denoiser_train, "train_encode_text_flops_per_step": inputs_train,
        "eval_flops_per_point": eval_total, "eval_denoiser_flops": eval_denoiser, "eval_text_flops": eval_text,
        "eval_vae_decode_flops": eval_decode, "eval_i3d_flops": eval_i3d,
        "overhead": eval_total / (every_n_steps * train_pixels),
        "overhead_latent_cache": eval_total / (every_n_steps * train_cache),
        "target": target, "every_n_steps_for_target": interval(train_pixels),
        "every_n_steps_for_target_latent_cache": interval(train_cache),
    }


def project_config(path: str | Path, backward_factor: float = 3.0) -> dict:
    """The FLOP projection of one config (see ``METHOD``): settings, per-part FLOPs and the overhead."""
    settings = read_projection_settings(load_config_chain(path))
    parts = build_meta_parts(settings)
    codec, backbone = parts["codec"], parts["backbone"]
    F, H, W = settings["num_frames"], settings["height"], settings["width"]
    c = codec.spatial_compression
    if H % c or W % c:
        raise ValueError(f"resolution {H}x{W} is not divisible by the codec's spatial compression {c}")
    latent_frames, h, w = codec.latent_frames(F), H // c, W // c
    pyramid = TemporalPyramid(settings["schedule"], latent_frames, settings["num_stages"], settings["reductions"],
                              settings["partition"], settings["anchor_first_frame"], settings["stage_weights"],
                              spatial_reductions=settings["spatial_reductions"])
    pyramid.stage_size(h, w, 0)  # a latent size the spatial strides do not divide is an error naming it
    text_model, tokens = parts["text"]
    with torch.device("meta"):
        video = torch.empty(1, 3, F, H, W)
        latents = torch.empty(1, codec.latent_channels, latent_frames, h, w)
        ids = torch.zeros(1, tokens, dtype=torch.long)
        clip = torch.empty(1, 3, F, INPUT_SIZE, INPUT_SIZE)
        i3d = InceptionI3d()
    notes = list(settings["notes"])
    with torch.no_grad():
        encode = count_flops(lambda: codec.encode(video))
        decode = count_flops(lambda: codec.decode(latents))
        text = count_flops(lambda: text_model(input_ids=ids))
        if F >= MIN_FRAMES:
            i3d_flops = count_flops(lambda: i3d(clip))
        else:
            i3d_flops = 0
            notes.append(f"num_frames={F} is below I3D's {MIN_FRAMES}; I3D FLOPs left uncounted")
    forward = stage_forward_flops(backbone, codec.latent_channels, parts["text_dim"], tokens, h, w)
    global_batch = (settings["batch_size"] * settings["devices"] * settings["num_nodes"]
                    * settings["accumulate_grad_batches"])
    result = project_overhead(pyramid, forward, global_batch=global_batch, num_videos=settings["num_videos"],
                              every_n_steps=settings["every_n_steps"], num_steps=settings["num_steps"],
                              guidance_scale=settings["guidance_scale"], encode_flops=encode, decode_flops=decode,
                              text_flops=text, i3d_flops=i3d_flops, backward_factor=backward_factor)
    result["per_clip"] = {"vae_encode_flops": encode, "vae_decode_flops": decode, "text_encoder_flops": text,
                          "i3d_flops": i3d_flops, "i3d_input": [F, INPUT_SIZE, INPUT_SIZE]}
    result["config"] = {k: settings[k] for k in ("num_frames", "height", "width", "batch_size", "devices",
                                                  "num_nodes", "accumulate_grad_batches", "latent_cache",
                                                  "schedule", "num_stages", "anchor_first_frame", "guidance_scale")}
    result["config"].update(latent_frames=latent_frames, latent_size=[h, w], path=str(path),
                            reductions=list(pyramid.reductions), partition=list(pyramid.partition),
                            spatial_reductions=list(pyramid.spatial_reductions),
                            stage_weights=list(pyramid.stage_weights))
    result["architectures"] = parts["architectures"]
    result["backward_factor"] = backward_factor
    result["uses_latent_cache"] = settings["latent_cache"]
    b_args = settings["backbone"].get("init_args", {}) or {}
    if b_args.get("gradient_checkpointing"):
        if b_args.get("lora") or b_args.get("train_mode") == "motion":
            notes.append("gradient checkpointing recomputes the forward (+1x) while the frozen base weights get no "
                         "weight gradients (about -1x): backward_factor 3 stays about right")
        else:
            heavier = result["train_denoiser_flops_per_step"] * (backward_factor + 1) / backward_factor
            notes.append(f"gradient checkpointing recomputes the forward: counting it (backward_factor "
                         f"{backward_factor + 1:g}) the overhead would be "
                         f"{100 * result['eval_flops_per_point'] / (result['every_n_steps'] * (heavier + result['train_encode_text_flops_per_step'])):.2f}% "
                         f"(pixels), {100 * result['eval_flops_per_point'] / (result['every_n_steps'] * heavier):.2f}% "
                         "(latent cache)")
    result["notes"] = notes
    return result


def print_projection(path: str, p: dict) -> None:
    T = 1e12
    cfg = p["config"]
    print(f"\n{path}  [FLOP projection, equal utilisation assumed; not a measurement]")
    print(f"  {cfg['num_frames']} frames {cfg['height']}x{cfg['width']} -> latents {cfg['latent_frames']}x"
          f"{cfg['latent_size'][0]}x{cfg['latent_size'][1]}; K={cfg['num_stages']}; global batch {p['global_batch']}; "
          f"FVD: {p['num_videos']} clips x {p['num_steps']} steps (cfg x{p['cfg_factor']}) every {p['every_n_steps']} steps")
    for s in p["stages"]:
        print(f"  stage {s['stage']}: {s['latent_frames']:3d} latent frames (stride {s['stride']}), train weight "
              f"{s['train_weight']:.2f}, {s['sample_steps']:2d} sample steps, forward {s['forward_flops'] / T:8.2f} TFLOP")
    rows = [("training / step (pixels: + VAE encode + text)", p["train_flops_per_step"]),
            ("training / step (latent cache)", p["train_flops_per_step_latent_cache"]),
            ("eval / FVD point", p["eval_flops_per_point"]),
            ("  denoiser", p["eval_denoiser_flops"]), ("  text encoder", p["eval_text_flops"]),
            ("  VAE decode", p["eval_vae_decode_flops"]), ("  I3D (generated clips)", p["eval_i3d_flops"])]
    for label, value in rows:
        print(f"  {label:<48s} {value / T:12.1f} TFLOP")
    for key, label in (("", "pixels"), ("_latent_cache", "latent cache")):
        over, n = p["overhead" + key], p["every_n_steps_for_target" + key]
        verdict = "meets" if over <= p["target"] else f"misses; every_n_steps={n} would reach"
        print(f"  overhead ({label}): {100 * over:6.2f}%  -> {verdict} the {100 * p['target']:.0f}% target")
    print(f"  this config trains from {'a latent cache' if p['uses_latent_cache'] else 'pixels'}")
    for note in p["notes"]:
        print(f"  note: {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None, help="a finished run folder with FVDCurve scalars")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224, help="input frame size (resized to 224 anyway)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="batch 2, one repeat")
    parser.add_argument("--project", action="append", default=[], metavar="CONFIG",
                        help="project the FVD-eval overhead of a full-size config by FLOPs (repeatable)")
    parser.add_argument("--backward-factor", type=float, default=3.0,
                        help="training FLOPs per forward FLOP in the projection (3: forward + backward)")
    parser.add_argument("--no-speed", action="store_true", help="skip the I3D clips/s measurement")
    parser.add_argument("--out", default="bench/results/fvd_cost.json")
    args = parse_bench_args(parser)
    if args.quick:
        args.batch, args.repeats = 2, 1
    result: dict[str, Any] = {"machine": platform.processor() or platform.machine(), "device": args.device,
                              "threads": torch.get_num_threads()}
    if not args.no_speed:
        result["i3d"] = i3d_clips_per_s(args.batch, 16, args.size, args.repeats, args.device)
        print(f"I3D on {args.device}: {result['i3d']['clips_per_s']:.2f} clips/s "
              f"(16 frames, batch {args.batch}, {args.size}px input)")
    if args.run:
        result["run"] = run_overhead(args.run)
        r = result["run"]
        print(f"{args.run}: FVD evaluation {r['fvd_eval_hours'] * 3600:.0f} s against training "
              f"{r['train_gpu_hours'] * 3600:.0f} s -> overhead {100 * r['overhead']:.1f}%")
        for tag, pts in r["fvd_points"].items():
            print(f"  {tag}: {pts}")
    if args.project:
        result["projection"] = {"method": METHOD, "target": TARGET, "configs": {}}
        for path in args.project:
            projection = project_config(path, args.backward_factor)
            result["projection"]["configs"][path] = projection
            print_projection(path, projection)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
