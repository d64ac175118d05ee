"""Export a trained backbone from a checkpoint: the LoRA adapter in peft/diffusers format, and/or a merged model.

    python -m tpdiff_lightning.cli.export --ckpt_path outputs/wan/tpdiff-lora-flow/checkpoints/last.ckpt \\
        --out exports/wan-tpdiff [--merged] [--no-ema]

Writes ``<out>/adapter`` (``adapter_config.json``, ``adapter_model.safetensors`` and diffusers'
``pytorch_lora_weights.safetensors``) when the backbone carries LoRA, and with ``--merged`` (or when there
is no adapter) ``<out>/merged``: the whole backbone in diffusers layout, loadable with ``from_pretrained``.
The base weights come from the folder the run was trained from, exactly as at predict time. EMA weights are
exported unless ``--no-ema``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tpdiff_lightning.models.lora import has_lora, merge_lora, save_adapter


def export_backbone(ckpt_path: str | Path, out_dir: str | Path, merged: bool = False, use_ema: bool = True) -> dict:
    """Write the adapter and/or merged backbone of the run saved in ``ckpt_path``; returns what was written."""
    from tpdiff_lightning.training.module import TPDiffModule

    ckpt_path = Path(ckpt_path)
    if ckpt_path.is_dir():
        raise ValueError(f"checkpoint {str(ckpt_path)!r} is a sharded (FSDP/DeepSpeed) checkpoint folder; consolidate "
                         "it into one file first: python -m lightning.pytorch.utilities.consolidate_checkpoint <folder>")
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"checkpoint {str(ckpt_path)!r} does not exist; expected a .ckpt file of a fit run")
    module = TPDiffModule.load_from_checkpoint(str(ckpt_path), map_location="cpu")
    model = getattr(module.backbone, "model", None)
    if model is None or not hasattr(model, "save_pretrained"):
        raise TypeError(f"the backbone {type(module.backbone).__name__} wraps no diffusers model; export works for "
                        "the diffusers backbones (Wan, AnimateDiff, Flux-style)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict = {"checkpoint": str(ckpt_path), "ema": bool(use_ema and module.ema is not None),
                     "global_step": getattr(module, "global_step_at_load", -1)}
    with module.ema_weights(use_ema):
        # Trained weights outside the diffusers model (e.g. the Flux-style pooled-text projection) travel beside it.
        extra = {n: p.detach().contiguous().cpu() for n, p in module.backbone.named_parameters()
                 if p.requires_grad and not n.startswith("model.")}
        if extra:
            from safetensors.torch import save_file

            save_file(extra, str(out / "backbone_extra.safetensors"))
            written["backbone_extra"] = str(out / "backbone_extra.safetensors")
        if has_lora(model):
            written["adapter"] = str(save_adapter(model, out / "adapter"))
        if merged or not has_lora(model):
            if has_lora(model):
                merge_lora(model)
            model.save_pretrained(str(out / "merged"))
            written["merged"] = str(out / "merged")
    (out / "export.json").write_text(json.dumps(written, indent=2))
    return written


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True, help="checkpoint of a fit run (e.g. .../checkpoints/last.ckpt)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--merged", action="store_true", help="also write the backbone with the adapter merged in")
    parser.add_argument("--no-ema", dest="use_ema", action="store_false", help="export the raw, not the EMA, weights")
    args = parser.parse_args(argv)
    written = export_backbone(args.ckpt_path, args.out, args.merged, args.use_ema)
    print(json.dumps(written, indent=2))
    return written


if __name__ == "__main__":
    main()
