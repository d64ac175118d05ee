"""Stacking decoded clips into the batches the module trains on."""

from __future__ import annotations

import torch

from tpdiff_lightning.data.latent_cache import pad_text
from tpdiff_lightning.data.lost_clips import SkipCounter


def collate_clips(samples: list[dict], counter: SkipCounter) -> dict:
    """Stack clips into `{"video": (B, 3, F, H, W), "caption": list[str], "num_skipped": LongTensor (),
    "skipped": list[str]}` (the clips the worker could not use, first seen since its previous batch).

    Latent samples give `"latent": (B, C, F, H', W')` and `"codec"` instead of `"video"`, plus padded
    `"text_emb": (B, L, D)`, `"text_mask": (B, L)` when the shards hold caption embeddings.
    """
    key = "latent" if "latent" in samples[0] else "video"
    skipped = counter.take()
    batch = {
        key: torch.stack([s[key] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "key": [s.get("key") for s in samples],
        "num_skipped": torch.tensor(len(skipped), dtype=torch.long),
        "skipped": skipped,
    }
    if key == "latent":
        codecs = {s["codec"] for s in samples}
        if len(codecs) != 1:
            raise ValueError(f"one batch mixes latent shards of {len(codecs)} codecs: {sorted(codecs)}")
        batch["codec"] = codecs.pop()
        if all("text_emb" in s for s in samples):
            encoders = {s["text_encoder"] for s in samples}
            if len(encoders) != 1:
                raise ValueError(f"one batch mixes caption embeddings of {len(encoders)} text encoders: "
                                 f"{sorted(encoders)}; re-encode the shards with one text encoder")
            batch["text_emb"], batch["text_mask"] = pad_text(samples)
            batch["text_encoder"] = encoders.pop()
    return batch
