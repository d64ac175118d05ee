"""Backbones (the built-in video DiT, Wan, Flux-style, AnimateDiff), text encoders, VAEs and LoRA."""
