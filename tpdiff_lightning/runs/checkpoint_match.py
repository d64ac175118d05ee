"""Before a run loads a checkpoint: does the configured network match it? If not, which settings differ.

Loading a checkpoint of another network fails deep inside ``load_state_dict`` with a list of tensor sizes,
after the run has already written its config and logs. This compares the tensor shapes first (the
checkpoint is memory-mapped, not read) and names the model settings that differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import torch


class CheckpointModelMismatchError(ValueError):
    """The configured model cannot load the checkpoint's weights."""


def flatten_settings(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"backbone": {"init_args": {"size": "dit-s"}}}`` -> ``{"backbone.init_args.size": "dit-s"}``."""
    if hasattr(value, "items"):
        items = {}
        for key, inner in value.items():
            items.update(flatten_settings(inner, f"{prefix}{key}."))
        return items
    value = list(value) if isinstance(value, tuple) else value
    return {prefix[:-1]: value}


def _short(key: str) -> str:
    """``backbone.init_args.size`` reads as ``backbone size``."""
    return key.replace(".init_args.", " ").replace(".class_path", " class")


def check_model_matches_checkpoint(model: torch.nn.Module, hparams: dict, ckpt_path: str | Path,
                                   ignore: Iterable[str] = (), read_settings: Callable[[dict], dict] = dict) -> None:
    """Raise :class:`CheckpointModelMismatchError` when a weight of ``model`` has another shape in the checkpoint,
    naming the settings (``hparams`` against the checkpoint's ``hyper_parameters`` as ``read_settings`` gives them,
    minus the groups in ``ignore``) that differ.
    """
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    stored = checkpoint.get("state_dict", {})
    current = model.state_dict()
    wrong = [(key, tuple(stored[key].shape), tuple(value.shape)) for key, value in current.items()
             if key in stored and hasattr(stored[key], "shape") and tuple(stored[key].shape) != tuple(value.shape)]
    if not wrong:
        return
    ignored = set(ignore) | {"_instantiator", "_class_path"}
    theirs = {k: v for k, v in flatten_settings(read_settings(checkpoint.get("hyper_parameters") or {})).items()
              if k.split(".")[0] not in ignored}
    ours = {k: v for k, v in flatten_settings(dict(hparams)).items() if k.split(".")[0] not in ignored}
    differ = [f"checkpoint has {_short(key)} {theirs.get(key)!r}, config asks {ours.get(key)!r}"
              for key in sorted(set(theirs) | set(ours)) if theirs.get(key) != ours.get(key)]
    shapes = "; ".join(f"{key}: {a} in the checkpoint, {b} configured" for key, a, b in wrong[:3])
    raise CheckpointModelMismatchError(
        f"ckpt_path={ckpt_path} holds another network than the config builds: "
        + ("; ".join(differ) if differ else shapes)
        + f" ({len(wrong)} weights differ in shape). Use the settings the checkpoint was trained with, "
        "or start a new run without --ckpt_path")
