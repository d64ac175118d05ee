"""Checks on local weight folders (diffusers / transformers layout) before anything is loaded from them.

There is no model hub at run time: every pretrained part comes from a local folder, and a missing or
incomplete folder must fail with an error that names the folder, what is missing and what was expected.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def check_weights_folder(path: str | Path, what: str, required: Sequence[str] = ("config.json",),
                         need_weights: bool = True, subfolder: str | None = None) -> Path:
    """Return the folder ``path[/subfolder]`` after checking that it holds the ``required`` files and,
    with ``need_weights``, at least one weight file.

    ``what`` names the part for the error message (for example ``"Wan transformer"``).
    """
    if path is None or str(path) == "":
        raise ValueError(f"{what}: no weights folder given; expected a local folder in diffusers/transformers layout")
    folder = Path(path).expanduser()
    if subfolder:
        folder = folder / subfolder
    if not folder.is_dir():
        holding = f"{', '.join(required)} and the weights" if required else "the model files"
        raise FileNotFoundError(
            f"{what}: weights folder {str(folder)!r} does not exist; expected a local folder holding "
            f"{holding} (models are never downloaded at run time)")
    missing = [name for name in required if not (folder / name).exists()]
    if missing:
        present = sorted(p.name for p in folder.iterdir())[:20]
        raise FileNotFoundError(
            f"{what}: weights folder {str(folder)!r} is incomplete: missing {missing}; found {present}")
    if need_weights and not any(p.name.endswith(WEIGHT_SUFFIXES) for p in folder.iterdir()):
        raise FileNotFoundError(
            f"{what}: weights folder {str(folder)!r} holds no weight file; expected one ending in "
            f"{' / '.join(WEIGHT_SUFFIXES)}")
    return folder


def resolve_part_folder(path: str | Path, subfolder: str | None, what: str) -> Path:
    """The folder holding one part's ``config.json`` and weights: ``path/subfolder`` (diffusers pipeline
    layout), or ``path`` itself when it is that part's own folder (it holds a ``config.json``)."""
    base = check_weights_folder(path, what, required=(), need_weights=False)
    if subfolder and not (base / "config.json").exists():
        return check_weights_folder(base, what, subfolder=subfolder)
    return check_weights_folder(base, what)


def config_class_name(folder: Path) -> str | None:
    """The ``_class_name`` that diffusers wrote into ``folder/config.json``."""
    return json.loads((folder / "config.json").read_text()).get("_class_name")


def cast_keeping_fp32_modules(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast ``model`` to ``dtype`` except the submodules its class keeps in float32 (diffusers'
    ``_keep_in_fp32_modules``, e.g. Wan's time embedder, norms and modulation table), as ``from_pretrained(
    torch_dtype=...)`` does; a plain ``.to(dtype)`` casts those too."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, tensor in tensors:  # diffusers' rule: a kept module's name is one of the dotted name's parts
        target = torch.float32 if keep & set(name.split(".")) else dtype
        if tensor.is_floating_point() and tensor.dtype != target:
            tensor.data = tensor.data.to(target)
    return model


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``"bfloat16"`` (or ``"torch.bfloat16"``) to ``torch.bfloat16``; ``None`` stays ``None``."""
    if name is None:
        return None
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={name!r} is not a floating torch dtype; expected e.g. 'bfloat16' or 'float32'")
    return dtype


WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
"""Attribute names that FSDP(1) and activation checkpointing insert between a module and its parameters;
``named_parameters()`` shows them, but both wrappers take them out of ``state_dict()`` keys."""


def state_dict_name(name: str) -> str:
    """A parameter name as ``state_dict()`` spells it, without the wrappers' inserted attribute names."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def exclude_frozen_from_state_dict(owner: nn.Module, child: str) -> None:
    """Leave the frozen parameters and the buffers of ``owner.<child>`` out of ``owner.state_dict()``, and let
    ``load_state_dict(strict=True)`` accept their absence.

    For parts loaded from a weights folder: those tensors come from the folder every time the part is built,
    so checkpoints hold only what is trained (a LoRA adapter, motion modules), never the frozen base. Works
    for any caller of ``state_dict()``: Lightning checkpoints, FSDP's sharded state dicts, DeepSpeed.
    """

    def frozen_names() -> set[str]:
        part = getattr(owner, child)
        names = {n for n, p in part.named_parameters(remove_duplicate=False) if not p.requires_grad}
        return {state_dict_name(n) for n in names | {n for n, _ in part.named_buffers(remove_duplicate=False)}}

    prefixes: list[str] = []

    def drop(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        for name in frozen_names():
            state_dict.pop(f"{prefix}{child}.{name}", None)

    def remember_prefix(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        prefixes.append(f"{prefix}{child}.")

    def forgive_missing(module: nn.Module, incompatible: Any) -> None:
        head = prefixes.pop() if prefixes else f"{child}."
        skip = {state_dict_name(head + name) for name in frozen_names()}
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if state_dict_name(k) not in skip]

    owner.register_state_dict_post_hook(drop)
    owner.register_load_state_dict_pre_hook(remember_prefix)
    owner.register_load_state_dict_post_hook(forgive_missing)


VOLATILE_CONFIG_KEYS = ("name_or_path", "dtype", "torch_dtype", "transformers_version")
"""Config entries that change with the library version or the load call, not with the model."""


def folder_label(folder: Path) -> str:
    """A short label of a weights folder for codec names: its last two path parts (``<model>/vae``), the same
    whether the folder was given as a pipeline root plus subfolder or directly."""
    return "/".join(folder.resolve().parts[-2:])


def config_digest(config: Any) -> str:
    """First 8 hex digits of a SHA-256 over the public entries of a (diffusers or transformers) config."""
    items = dict(config) if not hasattr(config, "to_dict") else config.to_dict()
    public = {k: v for k, v in items.items() if not k.startswith("_") and k not in VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(public, sort_keys=True, default=str).encode()).hexdigest()[:8]


def load_frozen_model(model_cls: type, pretrained_path: str | None, subfolder: str | None, config: dict | None,
                      what: str, dtype: str) -> tuple[nn.Module, str]:
    """Build a diffusers/transformers model from exactly one of a local folder or a config dict, frozen in eval
    mode. Returns the model and a label (the folder's, or ``"config"``) for the codec's name."""
    if (pretrained_path is None) == (config is None):
        given = "a dict" if config else config
        raise ValueError(f"{what}: got pretrained_path={pretrained_path!r} and config={given}; "
                         "expected exactly one of them (a local weights folder, or a config for random weights)")
    if pretrained_path is not None:
        folder = resolve_part_folder(pretrained_path, subfolder, what)
        model = model_cls.from_pretrained(str(folder), local_files_only=True, dtype=parse_dtype(dtype))
        label = folder_label(folder)
    else:
        model = model_cls.from_config(dict(config)).to(parse_dtype(dtype))
        label = "config"
    model.requires_grad_(False)
    model.eval()
    return model, label
