"""Caption encoders: `encoder(captions) -> (emb (B, L, dim), mask (B, L))`, with the width in `encoder.dim`.

Every encoder follows the `TextEncoder` protocol below. The default is a small T5 encoder on bytes,
built from a config (no download) and trained from scratch; CLIP and UMT5 encoders with pretrained
weights will plug in later with the same interface.
"""

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel


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


class T5TextEncoder(nn.Module):
    """A T5 encoder over UTF-8 bytes (ByT5 tokenizer), small enough to train on CPU."""

    def __init__(
        self,
        d_model: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        d_ff: int = 256,
        max_length: int = 64,
        trainable: bool = True,
    ):
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        # Byte-level tokenizer: needs no vocabulary file, so nothing is downloaded.
        self.tokenizer = ByT5Tokenizer()
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

    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Encode captions to `(emb (B, L, dim), mask (B, L))`, padded to the longest and cut at `max_length`.

        An empty caption (classifier-free guidance dropout) still has its end-of-sequence token, so L >= 1.
        """
        if isinstance(captions, str):
            raise TypeError(f"expected a list of captions, got the single string {captions!r}")
        device = next(self.model.parameters()).device
        batch = self.tokenizer(
            list(captions), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        ids = batch["input_ids"].to(device)  # (B, L)
        mask = batch["attention_mask"].to(device).bool()  # (B, L)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            emb = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, L, dim)
        return emb, mask
