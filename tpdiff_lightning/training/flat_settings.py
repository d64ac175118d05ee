"""Release 0.1.0 took the module's settings flat (``model.init_args.lr``) and lived in a flat package
(``tpdiff_lightning.module.TPDiffModule``). Its checkpoints still load: their hyperparameters are read into the
settings groups here. A config that still names a flat key or a moved class gets one line saying where it went.
Checkpoints from before the built-in text encoder had word tokens are read as what they were: bytes."""

from __future__ import annotations

from typing import Any

FLAT_KEYS: dict[str, str] = {
    "num_frames": "clip.num_frames", "resolution": "clip.resolution",
    "num_stages": "pyramid.num_stages", "reductions": "pyramid.reductions",
    "spatial_reductions": "pyramid.spatial_reductions", "partition": "pyramid.partition",
    "stage_weights": "pyramid.stage_weights", "anchor_first_frame": "pyramid.anchor_first_frame",
    "schedule": "objective.schedule", "beta_schedule": "objective.beta_schedule",
    "flow_velocity": "objective.flow_velocity", "alignment": "objective.alignment",
    "alignment_scope": "objective.alignment_scope", "caption_dropout": "objective.caption_dropout",
    "stage_seed": "objective.stage_seed", "stage_sync": "objective.stage_sync",
    "lr": "optimization.lr", "text_lr_scale": "optimization.text_lr_scale",
    "weight_decay": "optimization.weight_decay", "betas": "optimization.betas",
    "warmup_steps": "optimization.warmup_steps", "fused_optimizer": "optimization.fused_optimizer",
    "ema_decay": "optimization.ema_decay",
    "sample_steps": "sampling.steps", "sample_step_weights": "sampling.step_weights",
    "guidance_scale": "sampling.guidance_scale", "renoise": "sampling.renoise",
    "timestep_shift": "sampling.timestep_shift", "sample_num_frames": "sampling.num_frames",
    "sample_batch_size": "sampling.batch_size",
}
"""Each flat setting of release 0.1.0 and its place in the settings groups."""

MOVED_CLASS_PATHS: dict[str, str] = {
    "tpdiff_lightning.module.TPDiffModule": "tpdiff_lightning.training.module.TPDiffModule",
    "tpdiff_lightning.parallel.FSDP2Strategy": "tpdiff_lightning.distributed.fsdp2.FSDP2Strategy",
    "tpdiff_lightning.deepspeed_strategy.DeepSpeedStrategy": "tpdiff_lightning.distributed.deepspeed.DeepSpeedStrategy",
    "tpdiff_lightning.checkpoint_io.AtomicCheckpointIO": "tpdiff_lightning.runs.checkpoint_io.AtomicCheckpointIO",
}
"""Classes a config can name whose module moved when the package was laid out by role."""


BEFORE_WORD_TOKENS = {"tokens": "bytes", "word_buckets": 4096}
"""The T5 text encoder's token settings as every checkpoint saved before they existed had them (the defaults)."""

SETTINGS_ADDED_LATER = {
    ("text_encoder", ".T5TextEncoder"): BEFORE_WORD_TOKENS,
    ("backbone", ".VideoDiT"): {"absolute_positions": False},
}
"""Per (model slot, class), init arguments added after some checkpoints were saved, with the value those checkpoints
were trained with. A checkpoint without one gets it here, so a config that sets it otherwise (the default config's
word tokens and absolute positions) cannot change what the checkpoint's model is."""


def is_flat(hparams: dict[str, Any]) -> bool:
    """Whether ``hparams`` (a checkpoint's ``hyper_parameters``) hold any setting the flat way."""
    return any(key in FLAT_KEYS for key in hparams)


def grouped(hparams: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's hyperparameters with the flat settings of release 0.1.0 moved into their groups and a moved
    class path renamed; grouped ones are returned as they are. Flat settings whose group is also given lose to it."""
    out: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {}
    for key, value in hparams.items():
        if key in FLAT_KEYS:
            group, field = FLAT_KEYS[key].split(".")
            groups.setdefault(group, {})[field] = list(value) if isinstance(value, tuple) else value
        elif key == "_class_path":
            out[key] = MOVED_CLASS_PATHS.get(value, value)
        else:
            out[key] = value
    for group, values in groups.items():
        out[group] = {**values, **(out.get(group) or {})}
    for (slot, class_name), then in SETTINGS_ADDED_LATER.items():
        part = out.get(slot)
        if isinstance(part, dict) and str(part.get("class_path", "")).endswith(class_name):
            out[slot] = {**part, "init_args": {**then, **(part.get("init_args") or {})}}  # what it saved wins
    return out


def moved_setting_message(key: str, where: str) -> str | None:
    """One line for a flat key of release 0.1.0 that a config or the command line still names, or None."""
    if key in FLAT_KEYS:
        return (f"{where}: model.init_args.{key} moved to model.init_args.{FLAT_KEYS[key]} (the model's settings are "
                f"grouped: clip, pyramid, objective, optimization, sampling; see README, 'Model settings')")
    return None


def moved_class_message(class_path: str, where: str) -> str | None:
    """One line for a class path that moved, or None."""
    if class_path in MOVED_CLASS_PATHS:
        return f"{where}: class_path {class_path} moved to {MOVED_CLASS_PATHS[class_path]}"
    return None
