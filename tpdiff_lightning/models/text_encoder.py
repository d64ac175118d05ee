"""Caption encoders: `encoder(captions) -> (emb (B, L, dim), mask (B, L))`, with the width in `encoder.dim`.

Every encoder follows the `TextEncoder` protocol below. The default is a small T5 encoder on bytes or
on hashed words, built from a config (no download) and trained from scratch; CLIP and UMT5 encoders with pretrained
weights will plug in later with the same interface.
"""

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

from tpdiff_lightning.models.word_hash_tokenizer import WordHashTokenizer


@runtime_checkable
class TextEncoder(Protocol):
    """Maps a batch of captions to token embeddings and a mask that is True on real tokens."""

    dim: int

    def __call__(self, captions: list[str]) -> tuple[Tensor, Tensor]: ...


TIED_EMBEDDING_KEY = "model.encoder.embed_tokens.weight"  # the second name of T5's token embedding


def register_token_embedding_once(model: T5EncoderModel) -> None:
    """Keep T5's token embedding registered once, as ``shared``; the encoder stack still calls the same module.

    T5 registers one embedding module twice (``shared`` and ``encoder.embed_tokens``), i.e. one parameter under
    two names. FSDP(1) turns such a tied weight into a "shared parameter" whose gradient it cannot assign under
    bf16 mixed precision ("attempting to assign a gradient with dtype 'c10::BFloat16' to a tensor with grad_dtype
    'Float'"). Registered once, the weight is an ordinary parameter for every strategy; the forward pass, the
    weights and the EMA's names (which use the first name, ``shared``) are unchanged."""
    embedding = model.encoder._modules.pop("embed_tokens")
    if embedding.weight is not model.shared.weight:
        raise ValueError("the T5 encoder's embed_tokens does not share the weight of its `shared` embedding")
    # A plain attribute naming the registered module: called in forward, not registered, and FSDP's views of
    # `shared.weight` reach it.
    model.encoder.__dict__["embed_tokens"] = model.shared


def drop_second_embedding_key(state_dict, prefix, *args) -> None:
    """Checkpoints written before the embedding was registered once hold it under both names; the values are one
    tensor, so the second key is dropped before loading."""
    if prefix + "model.shared.weight" in state_dict:
        state_dict.pop(prefix + TIED_EMBEDDING_KEY, None)


TOKENS = ("bytes", "words")


class T5TextEncoder(nn.Module):
    """A T5 encoder small enough to train on CPU, over UTF-8 bytes (``tokens="bytes"``, the ByT5 tokenizer) or
    over words (``tokens="words"``: one id per word, from ``word_buckets`` hash buckets; see
    ``word_hash_tokenizer``). A shallow encoder on bytes can key a word on one of its bytes and confuse it with
    any other word holding that byte; word ids cannot."""

    def __init__(
        self,
        d_model: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        d_ff: int = 256,
        max_length: int = 64,
        trainable: bool = True,
        tokens: str = "bytes",
        word_buckets: int = 4096,
    ):
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        if tokens not in TOKENS:
            raise ValueError(f"tokens={tokens!r}: expected one of {', '.join(TOKENS)}")
        if max_length < 1:
            raise ValueError(f"max_length={max_length}: expected at least 1 token (the end-of-sequence token)")
        # Neither tokenizer needs a vocabulary file, so nothing is downloaded.
        self.tokenizer = ByT5Tokenizer() if tokens == "bytes" else WordHashTokenizer(word_buckets)
        self.tokens = tokens
        self.word_buckets = word_buckets if tokens == "words" else None  # part of the cached embeddings' identity
        config = T5Config(
            vocab_size=len(self.tokenizer),
            d_model=d_model,
            d_kv=d_model // num_heads,
            d_ff=d_ff,
            num_layers=num_layers,
            num_heads=num_heads,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        self.model = T5EncoderModel(config)
        register_token_embedding_once(self.model)
        self._register_load_state_dict_pre_hook(drop_second_embedding_key)
        self.dim = d_model
        self.max_length = max_length
        self.trainable = trainable
        if not trainable:
            self.model.requires_grad_(False)
            self.model.eval()

    def train(self, mode: bool = True) -> "T5TextEncoder":
        super().train(mode)
        if not self.trainable:
            self.model.eval()
        return self

    def tokenize(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Token ids and the real-token mask, each (B, L), padded to the longest and cut at ``max_length``."""
        if self.tokens == "words":
            return self.tokenizer(captions, self.max_length)
        batch = self.tokenizer(captions, padding="longest", truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"].bool()

    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Encode captions to `(emb (B, L, dim), mask (B, L))`, padded to the longest and cut at `max_length`.

        An empty caption (classifier-free guidance dropout) still has its end-of-sequence token, so L >= 1.
        """
        if isinstance(captions, str):
            raise TypeError(f"expected a list of captions, got the single string {captions!r}")
        device = next(self.model.parameters()).device
        ids, mask = self.tokenize(list(captions))
        ids, mask = ids.to(device), mask.to(device)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            emb = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, L, dim)
        return emb, mask


def check_token_embedding(state: dict[str, Tensor] | None, current: dict[str, Tensor], prefix: str = "") -> None:
    """Raise ValueError when a checkpoint's T5 encoder (its weights under ``prefix``) has another number of token ids
    than the one configured: it was trained on other tokens. Says which setting to change, before a raw size
    mismatch does."""
    key = prefix + "model.shared.weight"
    if state is None or key not in state or key not in current:
        return
    stored, here = state[key].shape[0], current[key].shape[0]
    if stored != here:
        raise ValueError(
            f"the checkpoint's text encoder has {stored} token ids and this model's {here}: it was trained with "
            f"other tokens (bytes: 384 ids; words: 2 + word_buckets). Set model.init_args.text_encoder.init_args."
            f"tokens (and word_buckets) to what it was trained with; checkpoints from before word tokens need "
            f"tokens=bytes")
