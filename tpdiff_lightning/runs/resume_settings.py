"""A resume never silently changes or ignores a setting: each one either carries over, or is applied and said,
or is refused in one line that says how to get what the user asked for.

- Optimization settings (learning rate, weight decay, betas, warmup, the EMA's decay) and sampling settings (the
  module's ``RESUMABLE_GROUPS``) may change when a run resumes: the module applies them to the restored optimizer and schedule
  (``TPDiffModule.on_train_start``), and the CLI names each change in one warning.
- Everything that defines what is trained (the pyramid, the objective, the network, the clip shape) must stay
  as the checkpoint has it; a change is refused before anything is written, with the way to train it anyway:
  a new run that starts from the checkpoint's weights (``--weights_from``).
- Data settings (batch size, shards, workers, seed) may change; each change is named in the same warning.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from tpdiff_lightning.runs.checkpoint_match import flatten_settings

# Runtime options of a backbone, text encoder or codec that do not change what is trained.
RUNTIME_PART_KEYS = ("gradient_checkpointing", "compile", "pretrained_path")
IGNORED_KEYS = ("_instantiator", "_class_path")


class ResumeSettingsError(ValueError):
    """A resume asked for a setting that the checkpoint's training cannot continue with."""


def _may_change(key: str, resumable: tuple[str, ...]) -> bool:
    parts = key.split(".")
    return parts[0] in resumable or (len(parts) >= 3 and parts[-2] == "init_args" and parts[-1] in RUNTIME_PART_KEYS)


def _flat(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in flatten_settings(dict(settings)).items() if k.split(".")[0] not in IGNORED_KEYS}


_MISSING = object()


def _default(key: str, flat: dict[str, Any]) -> Any:
    """The default of the part argument ``key`` (``...init_args.<name>``) in the class its ``class_path`` names, or
    ``_MISSING``: what a checkpoint saved before the argument existed was trained with."""
    parts = key.split(".")
    class_path = flat.get(".".join(parts[:-2] + ["class_path"])) if len(parts) >= 2 and parts[-2] == "init_args" else None
    if not isinstance(class_path, str):
        return _MISSING
    module, _, name = class_path.rpartition(".")
    try:
        parameter = inspect.signature(getattr(importlib.import_module(module), name)).parameters.get(parts[-1])
    except (ImportError, AttributeError, TypeError, ValueError):
        return _MISSING
    return _MISSING if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def setting_changes(stored: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (stored, current)}`` for every setting that differs (a key only one side has included). A
    part argument the stored settings lack (added to the code since) counts as unchanged at its default."""
    theirs, ours = _flat(stored), _flat(current)
    changes = {}
    for key in sorted(set(theirs) | set(ours)):
        a, b = theirs.get(key, _MISSING), ours.get(key, _MISSING)
        if a is _MISSING and b is not _MISSING and b == _default(key, ours):
            continue  # a checkpoint from before the argument existed: trained as its default
        if a != b:
            changes[key] = (None if a is _MISSING else a, None if b is _MISSING else b)
    return changes


def check_resume_settings(ckpt_path: str, stored_model: dict[str, Any], model: dict[str, Any],
                          stored_data: dict[str, Any] | None, data: dict[str, Any] | None,
                          resumable: tuple[str, ...], ema_key: str) -> list[str]:
    """Raise :class:`ResumeSettingsError` for a model setting the run cannot change on resume; return the
    changes it applies (``"model.init_args.optimization.lr: 0.001 -> 0.0005"``) for the caller to say.

    ``resumable`` names the settings groups that may change; ``ema_key`` the setting whose switch between a value
    and null changes what the checkpoint holds."""
    model_changes = setting_changes(stored_model, model)
    refused = {k: v for k, v in model_changes.items() if not _may_change(k, resumable)}
    ema = model_changes.get(ema_key)
    if ema is not None and (ema[0] is None) != (ema[1] is None):
        refused[ema_key] = ema  # switching the EMA on or off changes what the checkpoint holds
    if refused:
        items = "; ".join(f"model.init_args.{key}={new!r} (the checkpoint has {old!r})"
                          for key, (old, new) in refused.items())
        raise ResumeSettingsError(
            f"ckpt_path={ckpt_path}: a resume continues the checkpoint's training and cannot change {items}. "
            "Resume with the checkpoint's settings, or train the new ones in a new run that starts from its "
            f"weights: --weights_from {ckpt_path} (with another --trainer.logger.init_args.version)")
    applied = [f"model.init_args.{key}: {old!r} -> {new!r}" for key, (old, new) in model_changes.items()
               if key not in refused]
    if stored_data is not None and data is not None:
        applied += [f"data.init_args.{key}: {old!r} -> {new!r}" for key, (old, new) in setting_changes(
            stored_data, data).items() if key not in ("num_frames", "resolution")]  # linked: checked as model's
    return applied


def resumed_settings_message(ckpt_path: str, applied: list[str]) -> str:
    return (f"ckpt_path={ckpt_path}: resuming with settings that differ from the checkpoint's, applied from this "
            f"step on: {'; '.join(applied)}")
