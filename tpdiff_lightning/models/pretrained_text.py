"""Pretrained, frozen caption encoders for the paper's backbones: CLIP for SD1.5 (AnimateDiff) and UMT5 for Wan2.1.

Both follow the ``TextEncoder`` protocol of ``text_encoder.py``: ``encoder(captions) -> (emb (B, L, dim),
mask (B, L) bool)`` with the width in ``encoder.dim``, and both pad to a fixed length as their pipelines do.
They load from a diffusers pipeline folder (model under ``text_encoder/``, tokenizer under ``tokenizer/``)
or from one folder holding both; nothing is downloaded. Their weights stay out of ``state_dict()``, since
they are reloaded from the folder every time.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from tpdiff_lightning.models.weights_folder import (
    check_weights_folder,
    config_digest,
    exclude_frozen_from_state_dict,
    load_frozen_model,
)

CLIP_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
T5_TOKENIZER_FILES = (("tokenizer.json",), ("spiece.model",))


def tokenizer_folder(path: str | Path, subfolder: str | None, what: str,
                     file_sets: Sequence[Sequence[str]]) -> Path:
    """The folder holding a tokenizer: ``path/subfolder`` if it has one of the ``file_sets``, else ``path``."""
    base = check_weights_folder(path, what, required=(), need_weights=False)
    candidates = [base / subfolder, base] if subfolder else [base]
    for folder in candidates:
        if folder.is_dir() and any(all((folder / name).exists() for name in files) for files in file_sets):
            return folder
    expected = " or ".join(" + ".join(files) for files in file_sets)
    raise FileNotFoundError(f"{what}: no tokenizer in {' nor '.join(repr(str(c)) for c in candidates)}; expected "
                            f"{expected} there (a diffusers pipeline keeps it under {subfolder!r})")


def load_tokenizer(tokenizer_cls: type, folder: Path, what: str):
    """``tokenizer_cls.from_pretrained(folder)`` from local files only, its failures as a FileNotFoundError."""
    try:
        return tokenizer_cls.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise FileNotFoundError(f"{what}: the tokenizer in {str(folder)!r} does not load ({type(err).__name__}: "
                                f"{err}); expected a complete tokenizer folder") from err


def clean_caption(text: str) -> str:
    """Unescape HTML entities and collapse whitespace, as Wan's pipeline cleans prompts (without ftfy)."""
    return " ".join(html.unescape(html.unescape(text)).split())


class FrozenTextEncoder(nn.Module):
    """Shared parts of the pretrained caption encoders: a frozen ``self.model`` that stays in eval mode."""

    dim: int
    name: str
    max_length: int
    model: nn.Module

    def train(self, mode: bool = True) -> "FrozenTextEncoder":
        super().train(mode)
        self.model.eval()
        return self

    @staticmethod
    def check_captions(captions: list[str]) -> list[str]:
        """The captions as a list, or a TypeError when they are not a list of strings."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise TypeError(f"expected a list of caption strings, got {captions!r}")
        return list(captions)

    def tokenize(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask ``(B, max_length)``, padded to ``max_length`` and cut there."""
        batch = self.tokenizer(captions, padding="max_length", max_length=self.max_length, truncation=True,
                               return_attention_mask=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        return batch["input_ids"].to(device), batch["attention_mask"].to(device)


class CLIPTextEncoder(FrozenTextEncoder):
    """SD1.5's CLIP text encoder: captions padded to 77 tokens, the last hidden state as conditioning.

    The mask is all True over the ``max_length`` positions: SD1.5's UNet was trained attending to every one of
    the 77 positions, padding included, so hiding the padding would change its conditioning.

    Args:
        pretrained_path: a diffusers pipeline folder, or one folder with both the model and the tokenizer.
        subfolder_model: the model's subfolder in a pipeline folder.
        subfolder_tokenizer: the tokenizer's subfolder in a pipeline folder.
        max_length: tokens per caption (SD1.5: 77, the model's position count).
        dtype: the model's weight dtype.
    """

    def __init__(self, pretrained_path: str, subfolder_model: str | None = "text_encoder",
                 subfolder_tokenizer: str | None = "tokenizer", max_length: int = 77, dtype: str = "float32"):
        super().__init__()
        from transformers import CLIPTextModel, CLIPTokenizer

        folder = tokenizer_folder(pretrained_path, subfolder_tokenizer, "CLIP tokenizer", CLIP_TOKENIZER_FILES)
        self.tokenizer = load_tokenizer(CLIPTokenizer, folder, "CLIP tokenizer")
        self.model, label = load_frozen_model(CLIPTextModel, pretrained_path, subfolder_model, None,
                                              "CLIP text encoder", dtype)
        positions = self.model.config.max_position_embeddings
        if not 1 <= max_length <= positions:
            raise ValueError(f"max_length={max_length} is invalid for this CLIP text encoder; expected 1 to its "
                             f"{positions} positions")
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)
        self.name = f"clip:{label}:{config_digest(self.model.config)}"
        exclude_frozen_from_state_dict(self, "model")

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Encode captions to ``(emb (B, max_length, dim), mask (B, max_length))``, the mask all True."""
        ids, attention = self.tokenize(self.check_captions(captions))  # (B, L), (B, L)
        # As SD's pipelines: the attention mask goes to CLIP only for models configured to use it.
        use_mask = getattr(self.model.config, "use_attention_mask", False)
        emb = self.model(input_ids=ids, attention_mask=attention if use_mask else None).last_hidden_state  # (B, L, D)
        return emb, torch.ones_like(ids, dtype=torch.bool)


class UMT5TextEncoder(FrozenTextEncoder):
    """Wan2.1's UMT5 encoder: captions padded to 512 tokens, embeddings past each caption's end set to zero.

    The mask is True on the real tokens (the caption and its end token); the Wan pipeline feeds the zeroed
    padding to the transformer, which a backbone may keep or mask out.

    Args:
        pretrained_path: a diffusers pipeline folder, or one folder with both the model and the tokenizer.
        subfolder_model: the model's subfolder in a pipeline folder.
        subfolder_tokenizer: the tokenizer's subfolder in a pipeline folder.
        max_length: tokens per caption (Wan2.1: 512).
        dtype: the model's weight dtype (Wan keeps UMT5-XXL in bfloat16).
        model_class: ``"UMT5EncoderModel"`` (Wan) or ``"T5EncoderModel"`` (a T5 v1.1 encoder such as Flux's
            T5-XXL); both take the same tokenizer and padding.
    """

    MODEL_CLASSES = ("UMT5EncoderModel", "T5EncoderModel")

    def __init__(self, pretrained_path: str, subfolder_model: str | None = "text_encoder",
                 subfolder_tokenizer: str | None = "tokenizer", max_length: int = 512, dtype: str = "float32",
                 model_class: str = "UMT5EncoderModel"):
        super().__init__()
        import transformers
        from transformers import AutoTokenizer

        if model_class not in self.MODEL_CLASSES:
            raise ValueError(f"model_class={model_class!r} is invalid; expected one of {self.MODEL_CLASSES}")
        encoder_class = getattr(transformers, model_class)
        if max_length < 1:
            raise ValueError(f"max_length={max_length} is invalid; expected a positive number of tokens")
        folder = tokenizer_folder(pretrained_path, subfolder_tokenizer, "UMT5 tokenizer", T5_TOKENIZER_FILES)
        self.tokenizer = load_tokenizer(AutoTokenizer, folder, "UMT5 tokenizer")
        self.model, label = load_frozen_model(encoder_class, pretrained_path, subfolder_model, None,
                                              f"{model_class} text encoder", dtype)
        self.max_length = max_length
        self.dim = int(self.model.config.d_model)
        self.name = f"{'umt5' if model_class.startswith('U') else 't5'}:{label}:{config_digest(self.model.config)}"
        exclude_frozen_from_state_dict(self, "model")

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Encode captions to ``(emb (B, max_length, dim), mask (B, max_length))``, zero where the mask is False."""
        ids, attention = self.tokenize([clean_caption(c) for c in self.check_captions(captions)])  # (B, L), (B, L)
        emb = self.model(input_ids=ids, attention_mask=attention).last_hidden_state  # (B, L, D)
        mask = attention.bool()
        return emb.masked_fill(~mask[..., None], 0.0), mask
