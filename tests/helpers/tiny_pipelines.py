"""Tiny random pipeline folders (diffusers layout) for the backbone configs, and the overrides that point the
real YAML files at them and shrink them to a seconds-long CPU run."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.tiny_animatediff import save_tiny_animatediff
from tests.helpers.tiny_flux import save_tiny_flux
from tests.helpers.tiny_text import save_tiny_clip, save_tiny_umt5
from tests.helpers.tiny_vae import save_tiny_sd_vae, save_tiny_wan_vae
from tests.helpers.tiny_wan import save_tiny_wan

TEXT_DIM = 32
LATENT_CHANNELS = 4  # both tiny VAEs
KINDS = ("animatediff", "wan", "flux")


def config_kind(chain: list[Path]) -> str | None:
    """Which tiny pipeline a config chain needs: the base config's name prefix, or None (built-in DiT)."""
    base = chain[0].stem
    return next((kind for kind in KINDS if base.startswith(kind)), None)


def save_tiny_pipeline(kind: str, folder: Path) -> Path:
    """Write ``folder/{unet|transformer, vae, text_encoder, tokenizer}`` for ``kind``; returns ``folder``."""
    if kind == "animatediff":
        save_tiny_animatediff(folder, in_channels=LATENT_CHANNELS, text_dim=TEXT_DIM)
        save_tiny_sd_vae(folder)
        save_tiny_clip(folder, dim=TEXT_DIM)
    elif kind == "wan":
        save_tiny_wan(folder, in_channels=LATENT_CHANNELS, text_dim=TEXT_DIM)
        save_tiny_wan_vae(folder)
        save_tiny_umt5(folder, dim=TEXT_DIM)
    elif kind == "flux":
        save_tiny_flux(folder, in_channels=LATENT_CHANNELS, text_dim=TEXT_DIM)
        save_tiny_sd_vae(folder)
        save_tiny_umt5(folder, dim=TEXT_DIM)
    else:
        raise ValueError(f"kind={kind!r}; expected one of {KINDS}")
    return folder


def pipeline_overrides(kind: str, folder: Path, resolution: int = 32) -> list[str]:
    """CLI overrides: every ``pretrained_path`` to ``folder``, one CPU device, and a clip size the tiny
    VAEs take (17 frames, 1 + 4k, for Wan's causal VAE; 32 px = 4x4 latents, or 64 px = 8x8 latents where a
    spatio-temporal pyramid shrinks them by 4)."""
    args = [f"--model.init_args.{part}.init_args.pretrained_path={folder}"
            for part in ("backbone", "codec", "text_encoder")]
    # One CPU device in place of 8 GPUs; precision, accumulation, clipping and the optimizer stay as written.
    args += ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.num_nodes=1",
             "--data.init_args.target_fps=null", f"--data.init_args.resolution={resolution}"]
    if kind == "wan":
        args += ["--data.init_args.num_frames=17", "--model.init_args.backbone.init_args.text_length=16",
                 "--model.init_args.text_encoder.init_args.max_length=16"]
    if kind == "animatediff":
        args += ["--model.init_args.text_encoder.init_args.max_length=16"]
    if kind == "flux":
        args += ["--model.init_args.text_encoder.init_args.model_class=UMT5EncoderModel",
                 "--model.init_args.text_encoder.init_args.max_length=16"]
    return args
