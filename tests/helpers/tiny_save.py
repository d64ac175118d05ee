"""Save a random diffusers model into one part of a pipeline folder, as users' local weight folders are laid out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def save_random_part(model_class: type, config: dict[str, Any], folder: str | Path, subfolder: str,
                     seed: int = 0) -> Path:
    """Build ``model_class(**config)`` with seed ``seed``, save it under ``folder/subfolder`` and return
    ``folder``, so a config can name ``folder`` as the pretrained path."""
    folder = Path(folder)
    torch.manual_seed(seed)
    model_class(**config).save_pretrained(folder / subfolder)
    return folder
