"""A word-level tokenizer with no vocabulary file: each word maps to one of ``buckets`` ids by a stable hash.

A small text encoder trained from scratch on bytes can settle on byte shortcuts instead of words: on the
synthetic captions the default encoder read "red" as "the caption holds the byte `d`", so "a green square
moving down" (the only non-red caption with a `d`, in "down") was drawn red (docs/benchmarks.md §14). One id
per word takes that shortcut away. The hashing trick (one id per hash bucket, collisions allowed) keeps it
open-vocabulary and file-free like the byte tokenizer: any text tokenizes, nothing is downloaded, and the ids
are the same on every machine and in every process (CRC-32, not Python's per-process ``hash``).
"""

from __future__ import annotations

import re
import zlib
from typing import Sequence

import torch
from torch import Tensor

# A word is a run of letters, digits and apostrophes; every other visible character is a word of its own.
WORD = re.compile(r"[\w']+|[^\w\s]")


class WordHashTokenizer:
    """``tokenizer(captions, max_length) -> (ids (B, L), mask (B, L))``, padded to the longest and cut at
    ``max_length`` tokens, the end-of-sequence token included (as the byte tokenizer does)."""

    pad_token_id = 0
    eos_token_id = 1
    first_word_id = 2

    def __init__(self, buckets: int = 4096):
        if buckets < 1:
            raise ValueError(f"word_buckets={buckets}: expected a positive number of word ids")
        self.buckets = buckets

    def __len__(self) -> int:
        return self.first_word_id + self.buckets

    def words(self, caption: str) -> list[str]:
        """The caption's words, lower-cased."""
        return WORD.findall(caption.lower())

    def word_id(self, word: str) -> int:
        return self.first_word_id + zlib.crc32(word.encode("utf-8")) % self.buckets

    def __call__(self, captions: Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
        rows = [[self.word_id(w) for w in self.words(c)][: max_length - 1] + [self.eos_token_id] for c in captions]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        return ids, ids != self.pad_token_id
