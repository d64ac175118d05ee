"""Tiny random CLIP and UMT5 text encoders with tokenizers built from a small local vocabulary, saved in
diffusers pipeline layout (``text_encoder/`` and ``tokenizer/``), so tests load them by path."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

WORDS = "a an the red green blue square circle moving left right up down fast slow on of".split()
CLIP_MERGES = ["t h", "th e</w>", "r e", "re d</w>", "l e", "f t</w>", "i n", "in g</w>"]


def write_tiny_clip_tokenizer(folder: str | Path) -> Path:
    """Write a CLIP BPE tokenizer as SD1.5 ships it (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``):
    single letters with and without the end-of-word mark, a few merges, and the two special tokens."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokens = list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase]
    tokens += [merge.replace(" ", "") for merge in CLIP_MERGES] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(CLIP_MERGES) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def tiny_clip_tokenizer(folder: str | Path):
    """The tiny CLIP tokenizer, written to ``folder`` and read back."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(write_tiny_clip_tokenizer(folder)), local_files_only=True)


def tiny_clip_model(vocab_size: int, dim: int = 32, seed: int = 0):
    """A random two-layer ``CLIPTextModel`` of width ``dim`` with SD1.5's 77 positions."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab_size - 2,
                            eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    return CLIPTextModel(config).eval()


def save_tiny_clip(folder: str | Path, dim: int = 32, seed: int = 0) -> Path:
    """Save a tiny CLIP text encoder under ``folder/text_encoder`` and its tokenizer under ``folder/tokenizer``;
    returns ``folder``."""
    folder = Path(folder)
    tokenizer = tiny_clip_tokenizer(folder / "tokenizer")
    tiny_clip_model(len(tokenizer), dim, seed).save_pretrained(folder / "text_encoder")
    return folder


def tiny_umt5_tokenizer():
    """A unigram tokenizer over the test words and single letters, with T5's ``<pad>``, ``</s>``, ``<unk>``."""
    from transformers import T5Tokenizer

    pieces = ["<pad>", "</s>", "<unk>"] + ["▁" + w for w in WORDS] + list(string.ascii_lowercase) + ["▁"]
    vocab = [(piece, 0.0 if i < 3 else -float(i)) for i, piece in enumerate(pieces)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_umt5_model(vocab_size: int, dim: int = 32, seed: int = 0):
    """A random two-layer ``UMT5EncoderModel`` of width ``dim``."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config = UMT5Config(vocab_size=vocab_size, d_model=dim, d_kv=dim // 4, d_ff=2 * dim, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return UMT5EncoderModel(config).eval()


def save_tiny_umt5(folder: str | Path, dim: int = 32, seed: int = 0) -> Path:
    """Save a tiny UMT5 encoder under ``folder/text_encoder`` and its tokenizer under ``folder/tokenizer``;
    returns ``folder``."""
    folder = Path(folder)
    tokenizer = tiny_umt5_tokenizer()
    tokenizer.save_pretrained(folder / "tokenizer")
    tiny_umt5_model(len(tokenizer), dim, seed).save_pretrained(folder / "text_encoder")
    return folder
