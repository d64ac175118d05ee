"""Checks on local weight folders (diffusers / transformers layout) before anything is loaded from them.

There is no model hub at run time: every pretrained part comes from a local folder, and a missing or
incomplete folder must fail with an error that names the folder, what is missing and what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

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
        raise FileNotFoundError(
            f"{what}: weights folder {str(folder)!r} does not exist; expected a local folder holding "
            f"{', '.join(required)} and the weights (models are never downloaded at run time)")
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
