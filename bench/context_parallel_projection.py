"""Projected memory per GPU and tokens per rank for Wan 1.3B and 14B full fine-tunes under context parallelism.

    python bench/context_parallel_projection.py          # 8 GPUs of 80 GB, 81 frames at 480p and 720p
    python bench/context_parallel_projection.py --gpus 16 --gpu-gb 141

Arithmetic, not a measurement: no GPU is needed, and none was lent to measure it. The stage shapes come from
``configs/wan_lora_flow.yaml``'s pyramid (3 stages, rates 1/4, 1/2, 1, anchored first frame) and the Wan VAE
(4x in time with the first frame alone, 8x in space) and patch (1, 2, 2). Per GPU, under ``FSDP2Strategy`` with
its weights sharded over every rank and a (data, context) mesh of ``gpus / degree`` x ``degree``:

- model states: 16 bytes per parameter (float32 weights, gradients and Adam's two moments) / gpus, plus two
  blocks' bf16 weights gathered at a time (one in use, one prefetched);
- activations, bf16, per clip of ``tokens / degree`` tokens on each rank:
  with block checkpointing (``activation_checkpointing: true``), each block's input is kept
  (``layers x tokens x dim``) plus one block's internals while it is recomputed; without, every block's
  internals. A Wan block keeps about ``17 dim + 2 ffn`` values per token for backward (norms, q, k, v and their
  normed and rotated copies, attention and cross-attention outputs and projections, the FFN's hidden and
  activated values); attention itself is flash attention, linear in the tokens.
- traffic per rank and step, forward and backward, plus the recompute's forward with checkpointing. Ulysses
  (the degree divides the heads): four all-to-alls per block (q, k, v, out), each sending ``(d - 1) / d`` of the
  rank's ``tokens / d x dim`` bf16 values. Ulysses × ring (``context_parallel_attention: auto`` where the heads
  and the degree share a factor ``u``, ring attention alone where ``u = 1``): Ulysses over ``u`` ranks, then a ring
  of ``r = d / u``: forward passes the rank's k and v on ``r - 1`` times, backward passes them again and passes
  their float32 gradients ``r`` times (``tpdiff_lightning/distributed/ring_attention.py``).

What the projection leaves out (the CUDA context, allocator fragmentation, the text encoder and VAE if kept on
the GPU, temporary buffers of the loss) is why a configuration is called a fit only with ``--headroom`` to spare.
Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from math import gcd

from common import ROOT, parse_bench_args, print_table, pyramid_from_config, write_json

GB = 1e9


@dataclass(frozen=True)
class Transformer:
    name: str
    params: float
    dim: int
    ffn: int
    layers: int
    heads: int


MODELS = {
    "wan-1.3b": Transformer("Wan2.1 1.3B", 1.42e9, 1536, 8960, 30, 12),
    "wan-14b": Transformer("Wan2.1 14B", 14.3e9, 5120, 13824, 40, 40),
}
RESOLUTIONS = {"480p": (480, 832), "720p": (720, 1280)}


def latent_tokens(frames: int, height: int, width: int, pyramid) -> list[int]:
    """Tokens per clip at each stage for ``frames`` video frames of ``height x width`` through the Wan VAE and
    patch: ``1 + (frames - 1) / 4`` latent frames at the full rate, ``H/8 x W/8`` latents, 2 x 2 patches."""
    latent_frames = 1 + (frames - 1) // 4
    stages = pyramid.with_num_frames(latent_frames).stages
    return [s.num_frames * (height // 8 // s.spatial_stride // 2) * (width // 8 // s.spatial_stride // 2)
            for s in stages]


def memory_gb(model: Transformer, tokens: int, degree: int, gpus: int, checkpointing: bool) -> dict[str, float]:
    """The per-GPU bytes of the docstring's model, in GB."""
    rank_tokens = -(-tokens // degree)
    states = 16 * model.params / gpus + 2 * 2 * model.params / model.layers
    block = rank_tokens * (17 * model.dim + 2 * model.ffn) * 2
    if checkpointing:
        activations = model.layers * rank_tokens * model.dim * 2 + block
    else:
        activations = model.layers * block
    return {"states_gb": states / GB, "activations_gb": activations / GB, "total_gb": (states + activations) / GB}


def sent_gb(model: Transformer, tokens: int, degree: int, checkpointing: bool) -> float:
    """GB each rank sends per training step of one clip (the docstring's count)."""
    if degree == 1:
        return 0.0
    values = -(-tokens // degree) * model.dim * 2  # bytes of one (tokens / d, dim) bf16 tensor
    u = gcd(model.heads, degree)  # Ulysses degree; the ring takes the rest
    ring = degree // u
    ulysses = 4 * values * (u - 1) / u  # q, k, v and the output, one all-to-all each, per pass
    forward = ulysses + 2 * values * (ring - 1)  # k and v round the ring (each chunk: H / u heads of u shares)
    backward = ulysses + (2 * values * (ring - 1) + 2 * 2 * values * ring if ring > 1 else 0)  # + float32 dk, dv
    return model.layers * (forward * (2 if checkpointing else 1) + backward) / GB


def attention_path(model: Transformer, degree: int) -> str:
    """What ``context_parallel_attention: auto`` runs for this model and degree."""
    u = gcd(model.heads, degree)
    return "-" if degree == 1 else "Ulysses" if u == degree else "ring" if u == 1 else f"Ulysses {u} x ring {degree // u}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="memory of one GPU (H100: 80)")
    parser.add_argument("--headroom", type=float, default=0.15, help="fraction of the GPU left for what is not counted")
    parser.add_argument("--degrees", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--out", default="bench/results/context_parallel_projection.json")
    args = parse_bench_args(parser, argv)
    pyramid = pyramid_from_config([ROOT / "configs" / "wan_lora_flow.yaml"], num_frames=21)
    usable = args.gpu_gb * (1 - args.headroom)
    rows = []
    for key, model in MODELS.items():
        for res, (h, w) in RESOLUTIONS.items():
            stage_tokens = latent_tokens(args.frames, h, w, pyramid)
            for checkpointing in (True, False):
                for degree in args.degrees:
                    if args.gpus % degree:
                        continue
                    mem = memory_gb(model, stage_tokens[-1], degree, args.gpus, checkpointing)
                    rows.append({"model": key, "resolution": res, "checkpointing": checkpointing, "degree": degree,
                                 "attention": attention_path(model, degree), "stage_tokens": stage_tokens,
                                 "rank_tokens": [-(-t // degree) for t in stage_tokens], **mem,
                                 "fits": mem["total_gb"] <= usable,
                                 "sent_gb_per_step": sent_gb(model, stage_tokens[-1], degree, checkpointing)})
    print_table(["model", "res", "ckpt", "CP", "attention", "tokens/rank by stage", "states GB", "activ. GB", "total GB", "fits",
                 "sent GB/step"],
                [[r["model"], r["resolution"], "on" if r["checkpointing"] else "off", r["degree"],
                  r["attention"],
                  "/".join(str(t) for t in r["rank_tokens"]), f"{r['states_gb']:.1f}", f"{r['activations_gb']:.1f}",
                  f"{r['total_gb']:.1f}", "yes" if r["fits"] else "no", f"{r['sent_gb_per_step']:.1f}"]
                 for r in rows])
    result = {"args": vars(args), "usable_gb": usable, "models": {k: asdict(m) for k, m in MODELS.items()},
              "rows": rows}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
