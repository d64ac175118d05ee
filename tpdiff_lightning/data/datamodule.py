"""The Lightning DataModule: captioned clips from webdataset shards, with synthetic data built where asked for."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import braceexpand
import lightning as L
from torch.utils.data import DataLoader

from tpdiff_lightning.data.buckets import Bucket, parse_buckets
from tpdiff_lightning.data.decoding import fps_step
from tpdiff_lightning.data.frame_size import frame_size
from tpdiff_lightning.data.latent_cache import LATENT_FORMAT
from tpdiff_lightning.data.pipelines import eval_pipeline, train_pipeline
from tpdiff_lightning.data.ranks import data_parallel
from tpdiff_lightning.data.shard_formats import check_format, is_remote
from tpdiff_lightning.data.shard_records import recorded_clip_count
from tpdiff_lightning.data.synthetic import (
    GENERATOR_NAME,
    PATHS as SYNTHETIC_PATHS,
    SYNTHETIC_FPS,
    caption_for,
    read_manifest,
    synthetic_mismatch,
    write_synthetic_shards,
)

DEFAULT_PREDICT_PROMPTS = (
    caption_for("red", "square", "right", "fast"),
    caption_for("green", "circle", "left", "slow"),
    caption_for("blue", "square", "up", "fast"),
    caption_for("yellow", "circle", "down", "slow"),
)



log = logging.getLogger(__name__)


def _check_positive(**values: int) -> None:
    """Raise ValueError naming the first argument that is not a positive integer."""
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


class VideoDataModule(L.LightningDataModule):
    """Captioned video clips from webdataset shards (`mp4` + `txt` per sample), with synthetic data built on demand.

    Args:
        root: Folder holding the shards. Without explicit patterns, its `manifest.json` lists them
            (`splits.train.shards`, `splits.eval.shards`).
        train_shards: Brace pattern of training shards, e.g. `"train-{000000..000007}.tar"`, relative to
            `root` unless absolute, or any URL webdataset opens (`"https://host/train-{000000..000099}.tar"`,
            `"pipe:aws s3 cp s3://bucket/train-{000000..000099}.tar -"`). None reads the manifest in `root`.
        eval_shards: Brace pattern of evaluation shards, like `train_shards`. None reads the manifest.
        num_frames: Frames per clip, F.
        resolution: Frame size: an int for square frames, or ``[height, width]`` (e.g. ``[480, 832]``); clips are
            resized to cover it, keeping their aspect ratio, and centre-cropped.
        batch_size: Clips per batch for training, evaluation and prompts per batch for prediction.
        num_workers: DataLoader worker processes (0 decodes in the main process).
        train_steps_per_epoch: Training batches per epoch from the infinite resampled stream (rounded up to a
            multiple of `num_workers`, since webdataset counts the epoch per worker).
        seed: Base seed of shard resampling, shuffling, clip starts and prediction seeds (>= 0).
        frame_stride: Take every `frame_stride`-th decoded frame, so a clip spans (F - 1) * stride + 1 frames.
        target_fps: Instead of `frame_stride`, step through each clip so its frame rate (the sample json's
            `fps`, else the mp4's) comes nearest to this; None keeps `frame_stride`. A synthetic build is made
            long enough for the step this gives its 8 fps clips.
        sample_format: "video" (mp4 shards), "latent" (shards from `data/encode_latents.py`; `num_frames` still
            counts video frames, and the clips are not resized), or "auto": the manifest's `format`, else video.
        shuffle_buffer: Raw samples held by the training shuffle buffer.
        build_synthetic: Where `prepare_data` may write synthetic moving-shape shards when no patterns are
            given: a folder (``configs/default.yaml``: ``data/synthetic``), built only when `root` is that folder
            and has no manifest, so a mistyped `root` stops with an error instead of training on synthetic data;
            ``true`` builds at any `root` without a manifest; ``false`` never builds. An outdated synthetic build
            in `root` is rebuilt (unless ``false``), with a warning naming the arguments that changed.
        synthetic_num_train: Training clips of the synthetic build.
        synthetic_num_eval: Evaluation clips of the synthetic build.
        synthetic_paths: Where a synthetic clip's path lies: ``"anywhere"`` the whole shape stays in frame, or
            ``"centred"`` through the frame's centre (within 2 px), so the direction word fixes the shape's place in
            every frame (``configs/motion.yaml``; docs/benchmarks.md §12).
        predict_prompts: Captions to sample in `predict`; None uses a few synthetic captions.
        predict_seeds_per_prompt: Samples per prompt in `predict`, each with its own seed.
        buckets: Training shapes ``[[frames, height, width], ...]`` (video frames and pixels) instead of the one
            ``num_frames`` x ``resolution``: each clip trains at the bucket nearest its aspect ratio among those
            whose length it covers, decided from its size and length before decoding, resized to cover it and
            centre-cropped (``python -m tpdiff_lightning.data.buckets`` prints an equal-area set). Every bucket
            must fit every stage of the pyramid; evaluation and the FVD curve keep ``num_frames`` x
            ``resolution``. Video shards only. None: one shape.
        token_budget: Backbone tokens per training batch: each batch holds as many clips of one bucket as fit
            (at least one), instead of ``batch_size`` clips. None: ``batch_size`` clips per batch.
        stage_aware_batches: With ``token_budget``, draw each step's stage before its batch and fill the budget at
            that stage's shape (a stage-0 batch holds several times the clips of a full-rate one), with stage
            probabilities that keep ``stage_weights`` as each stage's share of training clips; false fills the
            budget at the full-rate shape for every stage.
    """

    def __init__(
        self,
        root: str = "data/synthetic",
        train_shards: str | None = None,
        eval_shards: str | None = None,
        num_frames: int = 16,
        resolution: int | tuple[int, int] = 32,
        batch_size: int = 8,
        num_workers: int = 2,
        train_steps_per_epoch: int = 200,
        seed: int = 0,
        frame_stride: int = 1,
        target_fps: float | None = None,
        sample_format: str = "auto",
        shuffle_buffer: int = 256,
        build_synthetic: bool | str = False,
        synthetic_num_train: int = 2048,
        synthetic_num_eval: int = 128,
        synthetic_paths: str = "anywhere",
        predict_prompts: list[str] | None = None,
        predict_seeds_per_prompt: int = 1,
        buckets: list[tuple[int, int, int]] | None = None,
        token_budget: int | None = None,
        stage_aware_batches: bool = True,
    ) -> None:
        super().__init__()
        _check_positive(
            num_frames=num_frames,
            resolution=min(frame_size(resolution)),
            batch_size=batch_size,
            train_steps_per_epoch=train_steps_per_epoch,
            frame_stride=frame_stride,
            shuffle_buffer=shuffle_buffer,
            synthetic_num_train=synthetic_num_train,
            synthetic_num_eval=synthetic_num_eval,
            predict_seeds_per_prompt=predict_seeds_per_prompt,
        )
        if num_workers < 0 or seed < 0:
            raise ValueError(f"num_workers and seed must be >= 0, got num_workers={num_workers}, seed={seed}")
        if synthetic_paths not in SYNTHETIC_PATHS:
            raise ValueError(f"data.init_args.synthetic_paths={synthetic_paths!r} is invalid; expected one of "
                             f"{list(SYNTHETIC_PATHS)}")
        if predict_prompts is not None and not predict_prompts:
            raise ValueError("predict_prompts is an empty list; pass None for the default prompts")
        self.buckets = parse_buckets(buckets) if buckets is not None else None
        if token_budget is not None and not (isinstance(token_budget, int) and token_budget >= 1):
            raise ValueError(f"data.init_args.token_budget={token_budget!r} is invalid; expected a positive number of "
                             "tokens per batch, or null for batch_size clips per batch")
        self.token_budget, self.stage_aware_batches = token_budget, stage_aware_batches
        self.save_hyperparameters()
        self.root = Path(root)
        self.train_shards, self.eval_shards = train_shards, eval_shards
        if target_fps is not None and not target_fps > 0:
            raise ValueError(f"target_fps={target_fps!r} is invalid; expected a positive frame rate or None")
        self.num_frames, self.resolution, self.frame_stride = num_frames, resolution, frame_stride
        self.target_fps = target_fps
        self.sample_format = check_format(sample_format)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.train_steps_per_epoch, self.shuffle_buffer = train_steps_per_epoch, shuffle_buffer
        self.build_synthetic = build_synthetic
        self.synthetic_num_train, self.synthetic_num_eval = synthetic_num_train, synthetic_num_eval
        self.synthetic_paths = synthetic_paths
        self.predict_prompts = list(predict_prompts or DEFAULT_PREDICT_PROMPTS)
        self.predict_seeds_per_prompt = predict_seeds_per_prompt
        self.resume_step: int | None = None

    def set_resume_step(self, step: int) -> None:
        """Reseed the training stream from `step` so a resumed run does not replay the start of the data.

        Without a call, `train_dataloader` uses the attached trainer's `global_step` (already restored from the
        checkpoint when Lightning builds the loader), so resuming through `ckpt_path` needs nothing extra.
        """
        if step < 0:
            raise ValueError(f"resume step must be >= 0, got {step}")
        self.resume_step = step

    def _synthetic_args(self) -> dict:
        """Arguments of the synthetic build that matches this module's clip length and resolution.

        With `target_fps` the clips are read at the frame step `target_fps` gives the synthetic frame rate, as
        `decode_clip` does, so they must be that much longer than with `frame_stride`.
        """
        size = max(frame_size(self.resolution))  # square clips, centre-cropped to the frame size
        if size < 4 or size % 2:
            raise ValueError(f"resolution={self.resolution!r} cannot be built as synthetic data: expected an even "
                             f"frame side >= 4 (H.264 stores yuv420p frames of even size), got {size}; "
                             f"use e.g. {max(4, size + size % 2)}")
        step = self.frame_stride if self.target_fps is None else fps_step(SYNTHETIC_FPS, self.target_fps)
        return dict(
            num_train=self.synthetic_num_train,
            num_eval=self.synthetic_num_eval,
            num_frames=(self.num_frames - 1) * step + 1,
            size=size,
            seed=self.seed,
            fps=SYNTHETIC_FPS,
            paths=self.synthetic_paths,
        )

    def prepare_data(self) -> None:
        """Build synthetic shards in `root` when asked to and no usable dataset is there (runs on one process).

        An existing synthetic build made with other arguments is rebuilt, with a warning naming the differences.
        """
        if not self.will_build_synthetic():
            return
        manifest = read_manifest(self.root)
        args = self._synthetic_args()
        reason = synthetic_mismatch(self.root, **args)
        if reason is None:
            return
        if manifest is not None:
            log.warning("rebuilding the synthetic data in %s: %s", self.root, reason)
        write_synthetic_shards(self.root, **args)

    def will_build_synthetic(self) -> bool:
        """Whether `prepare_data` may write synthetic shards into `root`: an outdated synthetic build there is
        rebuilt unless `build_synthetic` is false; a root without a manifest is built into only where
        `build_synthetic` names it (or is true)."""
        if self.build_synthetic is False or self.train_shards or self.eval_shards:
            return False
        manifest = read_manifest(self.root)
        if manifest is not None:
            return manifest.get("generator") == GENERATOR_NAME  # a real dataset is never overwritten
        return self.build_synthetic is True or Path(self.build_synthetic).resolve() == self.root.resolve()

    def _how_to_fix(self, manifest: dict | None) -> str:
        """How to get the missing shards: build synthetic data for a synthetic (or empty) root, else rebuild."""
        if manifest is None and isinstance(self.build_synthetic, str):
            return (f"expected webdataset shards listed by a manifest.json there, or shard patterns "
                    f"(train_shards, eval_shards); synthetic data is built only at "
                    f"build_synthetic={self.build_synthetic} (or wherever build_synthetic is true)")
        if manifest is None or manifest.get("generator") == GENERATOR_NAME:
            return (f"build synthetic data with `python data/make_synthetic.py --out {self.root}` "
                    "or set build_synthetic=true")
        return f"rebuild the dataset with the builder that wrote it ({manifest.get('generator')})"

    def shard_urls(self, split: str) -> list[str]:
        """Return the existing shard paths of `split` ("train" or "eval"), or raise FileNotFoundError saying how to fix it."""
        pattern = self.train_shards if split == "train" else self.eval_shards
        manifest = read_manifest(self.root) if pattern is None else None
        how = (self._how_to_fix(manifest) if pattern is None else
               f"check the {split}_shards pattern (shard names relative to root, or absolute)")
        if pattern is None:
            if manifest is None:
                where = "no such folder" if not self.root.exists() else f"no manifest.json in {self.root}"
                raise FileNotFoundError(f"{where} and no {split}_shards pattern given; {how}")
            if split not in manifest.get("splits", {}):
                raise FileNotFoundError(self._missing_split_message(manifest, split))
            names = manifest["splits"][split]["shards"]
        else:
            names = list(braceexpand.braceexpand(pattern))
        if all(is_remote(name) for name in names):
            return names  # webdataset opens URLs and `pipe:` commands itself; they cannot be checked here
        paths = [str(self.root / name) for name in names]
        missing = [path for path in paths if not Path(path).is_file()]
        if missing or not paths:
            shown = missing[0] if missing else pattern
            raise FileNotFoundError(f"{len(missing)} of {len(paths)} {split} shards missing (e.g. {shown}); {how}")
        return paths

    def shard_clip_counts(self, split: str) -> dict[str, int]:
        """Shard url -> number of samples, from the manifest's ``shard_clips`` (also for the shards of a pattern
        that the manifest in `root` lists), else from the record a builder wrote beside each shard (``.done``).
        Shards with neither are left out: one that ends early counts as at least one lost clip."""
        manifest = read_manifest(self.root)
        info = (manifest or {}).get("splits", {}).get(split, {})
        names, listed = info.get("shards", []), info.get("shard_clips")
        counts: dict[str, int] = {}
        if listed and len(listed) == len(names):
            counts = {name if is_remote(name) else str(self.root / name): count for name, count in zip(names, listed)}
        for url in self.shard_urls(split):
            if url not in counts and not is_remote(url) and (count := recorded_clip_count(url)) is not None:
                counts[url] = count
        return counts

    def num_clips(self, split: str) -> int | None:
        """The manifest's clip count of ``split`` (None without a manifest or with a shard pattern)."""
        pattern = self.train_shards if split == "train" else self.eval_shards
        manifest = read_manifest(self.root) if pattern is None else None
        return (manifest or {}).get("splits", {}).get(split, {}).get("num_clips")

    def _missing_split_message(self, manifest: dict, split: str) -> str:
        """Why `split` cannot be read from a manifest that lacks it, and the options there are."""
        has = sorted(manifest.get("splits", {}))
        head = f"{self.root / 'manifest.json'} lists no {split!r} split (it has {has})"
        if manifest.get("generator") == GENERATOR_NAME:
            return f"{head}; {self._how_to_fix(manifest)}"
        pattern_arg = "train_shards" if split == "train" else "eval_shards"
        if split == "train":
            return (f"{head}; pass --data.init_args.{pattern_arg} with a shard pattern of training clips "
                    f"(absolute, or relative to {self.root}), or point root at a dataset with a 'train' split")
        if manifest.get("format") == LATENT_FORMAT:
            return (f"{head}. Either encode that split too (python data/encode_latents.py --splits train {split}, "
                    f"from data that has it), pass --data.init_args.{pattern_arg} with a pattern of latent shards "
                    f"of held-out clips (absolute, or relative to {self.root}), or turn validation off with "
                    "--trainer.limit_val_batches=0")
        return (f"{head}. Either pass --data.init_args.{pattern_arg} with a shard pattern of held-out clips "
                f"(absolute, or relative to {self.root}), e.g. MSR-VTT test shards from data/build_msrvtt.py: "
                f"'/path/to/msrvtt/test-{{000000..000002}}.tar', or turn validation off with "
                "--trainer.limit_val_batches=0")

    def resolved_format(self) -> str:
        """The shard format in use: `sample_format`, or with "auto" the manifest's `format` (else video)."""
        if self.sample_format != "auto":
            return self.sample_format
        manifest = read_manifest(self.root)
        return manifest.get("format", "video") if manifest else "video"

    def _rank_and_world_size(self) -> tuple[int, int]:
        """The data-parallel replica of the attached trainer and their number, or (0, 1) when used on its own."""
        return data_parallel(self.trainer)

    def _loader(self, dataset: Any) -> DataLoader:
        """Wrap a batched pipeline in a DataLoader that passes its batches through unchanged."""
        return DataLoader(
            dataset, batch_size=None, num_workers=self.num_workers, persistent_workers=self.num_workers > 0
        )

    def train_dataloader(self) -> DataLoader:
        """Infinite resampled training batches, cut into epochs of about `train_steps_per_epoch` batches."""
        rank, _ = self._rank_and_world_size()
        resume_step = self.resume_step
        if resume_step is None:
            resume_step = 0 if self.trainer is None else self.trainer.global_step
        batches_per_worker = math.ceil(self.train_steps_per_epoch / max(1, self.num_workers))
        accumulate = getattr(self.trainer, "accumulate_grad_batches", 1) if self.trainer is not None else 1
        pipeline = train_pipeline(
            self.shard_urls("train"),
            self.num_frames,
            self.resolution,
            self.batch_size,
            frame_stride=self.frame_stride,
            seed=self.seed,
            rank=rank,
            resume_step=resume_step,
            shuffle_buffer=self.shuffle_buffer,
            target_fps=self.target_fps,
            sample_format=self.resolved_format(),
            shard_clips=self.shard_clip_counts("train"),
            plan=self.batch_plan(),
            first_step=resume_step * accumulate,  # the micro-step of the first batch (the module's stage draw)
            batches_per_worker=batches_per_worker,
        )
        return self._loader(pipeline.with_epoch(batches_per_worker))

    def batch_plan(self, model: Any = None):
        """The token-budget plan of the training batches (``buckets`` or ``token_budget`` set), from ``model`` (by
        default the one being trained: its pyramid and backbone count the tokens); None for fixed batches of one
        shape."""
        if self.buckets is None and self.token_budget is None:
            return None
        if model is None and self.trainer is not None:
            model = getattr(self.trainer, "lightning_module", None)
        if not hasattr(model, "batch_plan"):
            raise ValueError("data.init_args.buckets and token_budget need the model being trained (a TPDiffModule "
                             "attached through the trainer) to count each bucket's tokens")
        height, width = frame_size(self.resolution)
        buckets = self.buckets or [Bucket(self.num_frames, height, width)]
        if self.token_budget is None:  # buckets alone: batch_size clips of one bucket per batch
            return model.batch_plan(buckets, None, False, clips=self.batch_size)
        return model.batch_plan(buckets, self.token_budget, self.stage_aware_batches)

    def val_dataloader(self) -> DataLoader:
        """Every evaluation clip once (split across ranks), from its first frame; the last batch may be partial."""
        rank, world_size = self._rank_and_world_size()
        pipeline = eval_pipeline(
            self.shard_urls("eval"),
            self.num_frames,
            self.resolution,
            self.batch_size,
            frame_stride=self.frame_stride,
            rank=rank,
            world_size=world_size,
            target_fps=self.target_fps,
            sample_format=self.resolved_format(),
            shard_clips=self.shard_clip_counts("eval"),
        )
        return self._loader(pipeline)

    def predict_items(self) -> list[dict]:
        """Prompt x seed grid as `{"caption", "seed", "index"}` dicts; seeds are `seed + index`, so reruns match."""
        items = []
        for caption in self.predict_prompts:
            for _ in range(self.predict_seeds_per_prompt):
                index = len(items)
                items.append({"caption": caption, "seed": self.seed + index, "index": index})
        return items

    def predict_dataloader(self) -> DataLoader:
        """Batches of `{"caption": list[str], "seed": LongTensor (B,), "index": LongTensor (B,)}` over prompts x seeds.

        With several ranks the items are padded to a multiple of the world size with placeholders
        (``index = -1``, dropped by ``predict_step``): Lightning splits predict items across ranks without
        repeating any, so otherwise one rank would run a batch more than another, and under a sharded
        strategy (FSDP, ZeRO-3) the ranks' forward passes would stop matching and hang.
        """
        items = self.predict_items()
        world_size = self._rank_and_world_size()[1]
        items += [dict(items[-1], index=-1) for _ in range((-len(items)) % world_size)]
        return DataLoader(items, batch_size=self.batch_size, shuffle=False)
