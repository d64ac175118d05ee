"""Latent shards: clips encoded once by the model's codec (and, for a frozen encoder, their caption
embeddings), so training skips decoding and encoding.

A latent sample is ``{"__key__", "latent.pth": (C, F', H', W'), "txt": caption, "json": metadata,
["text.pth": {"emb": (L, D), "mask": (L,)}]}``. The metadata and the manifest name the codec and the
text encoder; a model with another codec refuses the shards with a clear error.

A cache encoded per bucket (a config with ``data.init_args.buckets``): each clip is encoded at its bucket's
shape, its metadata names the bucket (``"bucket": [frames, height, width]``, video frames and pixels), and the
manifest counts the clips of each bucket (``splits.<split>.buckets``), so training from the cache batches
clips of one bucket together and a config whose buckets do not cover the cache is refused before it runs.
"""

from __future__ import annotations

import io
import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import webdataset as wds
from torch import Tensor, nn
from tqdm import tqdm

from tpdiff_lightning.data.buckets import Bucket
from tpdiff_lightning.data.shard_records import remove_shard, write_json_atomic, write_split_records
from tpdiff_lightning.data.video_io import ClipLengthError

LATENT_FORMAT = "latent"


class LatentBucketError(ValueError):
    """A latent clip carries no bucket, or one the run's buckets lack: the cache does not fit the config, which
    skipping samples cannot mend, so the stream stops on it instead of skipping every clip."""


def module_identity(module: nn.Module) -> dict:
    """What must match between the shards and the model: class, the codec's declared name and shape factors, and
    the text encoder's width, weights folder and tokens (bytes, or words and their number of hash buckets)."""
    identity = {"class": f"{type(module).__module__}.{type(module).__qualname__}"}
    for attr in ("name", "latent_channels", "temporal_compression", "spatial_compression", "dim", "name_or_path",
                 "tokens", "word_buckets"):
        value = getattr(module, attr, None)
        if isinstance(value, (str, int, float)):
            identity[attr] = value
    return identity


def check_codec(stored: dict, codec: nn.Module) -> None:
    """Raise ValueError when latent shards were encoded by another codec than the model's."""
    expected = module_identity(codec)
    if stored != expected:
        raise ValueError(f"latent shards were encoded with codec {stored}, but the model's codec is {expected}; "
                         "re-encode them with `python data/encode_latents.py` for this model")


def check_text_encoder(stored: dict | None, text_encoder: nn.Module) -> None:
    """Raise ValueError when cached caption embeddings came from another text encoder than the model's."""
    expected = module_identity(text_encoder)
    if stored is not None and "tokens" not in stored and expected.get("tokens") == "bytes":
        del expected["tokens"]  # shards written before the T5 encoder had word tokens: those were bytes
    if stored != expected:
        raise ValueError(f"latent shards hold caption embeddings of text encoder {stored}, but the model's is "
                         f"{expected}; re-encode with `python data/encode_latents.py` for this model")


def tensor_bytes(value: Any) -> bytes:
    """Serialise a tensor or a dict of tensors with ``torch.save``."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def tensor_from_bytes(data: bytes) -> Any:
    """Inverse of :func:`tensor_bytes` (tensors only, no arbitrary objects)."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def latent_sample(key: str, latent: Tensor, caption: str, meta: dict, text: tuple[Tensor, Tensor] | None) -> dict:
    """One webdataset sample of a latent shard; ``text`` is the caption's ``(emb (L, D), mask (L,))`` or None."""
    sample = {"__key__": key, "latent.pth": tensor_bytes(latent.contiguous()), "txt": caption,
              "json": json.dumps(meta)}
    if text is not None:
        emb, mask = text
        sample["text.pth"] = tensor_bytes({"emb": emb.contiguous(), "mask": mask.contiguous()})
    return sample


def decode_latent(sample: dict, num_frames: int, rng: random.Random | None,
                  buckets: Sequence[Bucket] | None = None) -> dict:
    """Read one latent sample into ``{"latent": (C, F', H', W'), "caption", "codec", ["text_emb", "text_mask"]}``.

    ``num_frames`` counts video frames, as everywhere. Without temporal compression a window of that many
    latent frames is taken (random with ``rng``, else the first); a temporally compressing codec's latents are
    taken whole, and must have been encoded from clips of exactly ``num_frames`` frames.

    With ``buckets``, the sample's own bucket (from its metadata; one of ``buckets``) sets the frames instead,
    and the clip gains ``bucket``.
    """
    latent = tensor_from_bytes(sample["latent.pth"]).float()  # (C, F', H', W')
    meta = json.loads(sample["json"])
    bucket = None
    if buckets is not None:
        if "bucket" not in meta:
            raise LatentBucketError("latent sample has no bucket in its metadata (encoded before buckets); re-encode "
                                    "with `python data/encode_latents.py`")
        bucket = Bucket(*meta["bucket"])
        if bucket not in buckets:
            raise LatentBucketError(f"latent sample of bucket {bucket} is not one of data.init_args.buckets "
                                    f"{[str(b) for b in buckets]}; expected shards encoded with these buckets")
        num_frames = bucket.frames
    if int(meta["codec"].get("temporal_compression", 1)) != 1:
        encoded = meta.get("num_frames")
        if encoded != num_frames:
            raise ClipLengthError(f"latent shard clip was encoded from {encoded} frames; num_frames={num_frames} "
                                  "was asked for. Re-encode with `python data/encode_latents.py` at this clip length",
                                  frames=int(encoded or 0), num_frames=num_frames, unit="encoded video frames",
                                  exact=True)
        num_frames = latent.shape[1]
    if latent.ndim != 4:
        raise ValueError(f"latent of shape {tuple(latent.shape)} is not (C, F', H', W')")
    if latent.shape[1] < num_frames:
        raise ClipLengthError(f"latent of shape {tuple(latent.shape)} has too few frames; "
                              f"expected (C, >={num_frames}, H, W)",
                              frames=latent.shape[1], num_frames=num_frames, unit="latent frames")
    start = 0 if rng is None else rng.randint(0, latent.shape[1] - num_frames)
    out = {"latent": latent[:, start : start + num_frames], "caption": sample["txt"].decode("utf-8"),
           "codec": json.dumps(meta["codec"], sort_keys=True)}
    if bucket is not None:
        out["bucket"] = bucket
    if "text.pth" in sample:
        text = tensor_from_bytes(sample["text.pth"])
        out["text_emb"], out["text_mask"] = text["emb"].float(), text["mask"].bool()
        out["text_encoder"] = json.dumps(meta.get("text_encoder"), sort_keys=True)
    return out


def pad_text(samples: list[dict]) -> tuple[Tensor, Tensor]:
    """Pad per-sample caption embeddings ``(L_i, D)`` to ``(B, L, D)`` with a mask ``(B, L)``."""
    length = max(s["text_emb"].shape[0] for s in samples)
    first = samples[0]["text_emb"]
    emb = torch.zeros(len(samples), length, first.shape[1], dtype=first.dtype, device=first.device)
    mask = torch.zeros(len(samples), length, dtype=torch.bool, device=first.device)
    for b, s in enumerate(samples):
        n = s["text_emb"].shape[0]
        emb[b, :n], mask[b, :n] = s["text_emb"], s["text_mask"]
    return emb, mask


@torch.no_grad()
def encode_split(codec: nn.Module, text_encoder: nn.Module | None, batches: Iterable[dict], out_dir: Path,
                 split: str, clips_per_shard: int = 256, dtype: torch.dtype = torch.float16,
                 total: int | None = None) -> dict:
    """Encode every clip of ``batches`` (dicts with "video" and "caption") into ``<split>-%06d.tar`` latent shards.

    Returns the split's manifest entry, which lists the shards of this run only and counts the clips of each
    shape (``buckets``: ``{"FxHxW": clips}``); ``<split>`` shards of an earlier encoding in ``out_dir`` are
    deleted first. ``text_encoder`` None stores no caption embeddings. A batch holds clips of one shape (its
    bucket, when the clips were decoded at their buckets).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_split_shards(out_dir, split)
    codec_id = module_identity(codec)
    text_id = module_identity(text_encoder) if text_encoder is not None else None
    count, skipped, shapes = 0, 0, Counter()
    pattern = str(out_dir / f"{split}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=clips_per_shard, verbose=0, start_shard=0) as sink, \
            tqdm(total=total, desc=f"encoding {split}", unit="clip") as bar:
        for batch in batches:
            skipped += int(batch.get("num_skipped", 0))
            device = next(codec.parameters(), torch.zeros(())).device
            latents = codec.encode(batch["video"].to(device)).to(dtype).cpu()  # (B, C, F', H', W')
            texts = None
            if text_encoder is not None:
                emb, mask = text_encoder(list(batch["caption"]))
                texts = [(emb[b][mask[b]].to(dtype).cpu(), mask[b][mask[b]].cpu()) for b in range(len(emb))]
            bucket = Bucket(*batch["video"].shape[2:])  # video frames and pixels
            for b, caption in enumerate(batch["caption"]):
                meta = {"codec": codec_id, "text_encoder": text_id, "shape": list(latents[b].shape),
                        "num_frames": bucket.frames, "bucket": [bucket.frames, bucket.height, bucket.width]}
                sink.write(latent_sample(f"{split}-{count:08d}", latents[b], caption, meta,
                                         texts[b] if texts else None))
                count += 1
                shapes[str(bucket)] += 1
                bar.update(1)
        num_shards = sink.shard  # shards opened by this writer, numbered from 0
    shards = [Path(pattern % index).name for index in range(num_shards)]
    shard_clips = [min(clips_per_shard, count - index * clips_per_shard) for index in range(num_shards)]
    write_split_records(out_dir, shards, shard_clips)
    return {"shards": shards, "num_clips": count, "shard_clips": shard_clips, "skipped": skipped,
            "buckets": dict(sorted(shapes.items()))}


def remove_split_shards(out_dir: Path, split: str) -> list[str]:
    """Delete the ``<split>-NNNNNN.tar`` shards in ``out_dir`` (of an earlier encoding); return their names."""
    removed = []
    for path in sorted(out_dir.glob(f"{split}-*.tar")):
        if re.fullmatch(rf"{re.escape(split)}-\d{{6}}\.tar", path.name):
            remove_shard(path)
            removed.append(path.name)
    return removed


def write_latent_manifest(out_dir: Path, splits: dict, codec: nn.Module, text_encoder: nn.Module | None,
                          source: str) -> dict:
    """Write ``manifest.json`` marking the folder as latent shards of this codec and text encoder."""
    manifest = {"generator": __name__, "format": LATENT_FORMAT, "source": source,
                "codec": module_identity(codec),
                "text_encoder": module_identity(text_encoder) if text_encoder is not None else None,
                "splits": splits}
    write_json_atomic(out_dir / "manifest.json", manifest)
    return manifest
