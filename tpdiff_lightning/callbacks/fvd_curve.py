"""FVD against steps, GPU-hours and training FLOPs in TensorBoard: sample fixed prompts every N steps and score
them against real clips; on the synthetic dataset, also how often the samples show their caption's colour and
direction of motion."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from tpdiff_lightning.callbacks.sample_logger import tensorboard_gif_summary
from tpdiff_lightning.callbacks.visualize import gif_bytes, side_by_side
from tpdiff_lightning.data.pipelines import eval_pipeline
from tpdiff_lightning.data.ranks import context_parallel_rank, data_parallel
from tpdiff_lightning.data.synthetic import read_manifest
from tpdiff_lightning.data.caption_accuracy import COLOUR_CHANCE, DIRECTION_CHANCE, caption_accuracy
from tpdiff_lightning.metrics.fvd import FVD
from tpdiff_lightning.runs.tensorboard import purge_step_of
from tpdiff_lightning.training.flop_meter import FlopMeter, step_kind
from tpdiff_lightning.training.module import to_uint8_video


class FVDCurve(L.Callback):
    """Every ``every_n_steps`` optimizer steps and at the end of fit, FVD of ``num_videos`` generated clips.

    Prompts are the captions of the first ``num_videos`` clips of the eval set, each sampled with seed
    ``seed + k`` (EMA weights when the module has them); generation is split across ranks. Real-clip
    statistics are computed once per (eval set, clip count, frames, resolution, frame step, extractor) and
    cached. Real clips are read at the training data's frame step (``frame_stride`` or ``target_fps`` of the
    datamodule), the frame rate the model generates at.

    Logged to TensorBoard: ``fvd/<name>-<N>`` against the global step, the same value at
    x = milli-GPU-hours in ``fvd/<name>-<N>@mGPUh`` (in the run folder's ``gpu_hours`` sub-run, which resumes on
    its own axis) and at x = training GFLOPs in ``fvd/<name>-<N>@GFLOP`` (the ``flops`` sub-run; counted by
    ``training.flop_meter``), ``compute/gpu_hours`` (training wall clock × devices, FVD evaluation excluded),
    ``compute/train_tflops`` and ``compute/fvd_eval_hours``. The GPU-hours and FLOPs live in the callback state,
    so a resumed run continues the x-axes.

    With ``caption_accuracy`` (the synthetic dataset, whose captions name a colour and a direction of motion), the
    same generated clips are checked against their captions (``data.caption_accuracy``) and
    ``caption/colour_accuracy``, ``caption/direction_accuracy`` and their chance levels ``caption/colour_chance``
    and ``caption/direction_chance`` are logged on the same three axes.

    Args:
        eval_root: folder of the eval set (a shard folder with ``manifest.json``).
        eval_split: split of that manifest holding the real clips.
        name: eval-set name used in the tag.
        num_videos: N, generated and real clips per evaluation (papers use 2048; small N biases FVD upward).
        every_n_steps: optimizer steps between evaluations.
        seed: seed of the first prompt.
        num_steps: sampling steps (default the module's).
        cache_dir: where real statistics are cached.
        num_sample_videos: how many of the generated clips to log as one GIF.
        feature_extractor: ``videos -> features`` override (default: I3D); ``extractor_name`` keys its cache.
        caption_accuracy: also check the clips against their synthetic captions (colour and direction).
    """

    def __init__(self, eval_root: str = "data/synthetic", eval_split: str = "eval", name: str = "synthetic",
                 num_videos: int = 16, every_n_steps: int = 500, seed: int = 0, num_steps: int | None = None,
                 cache_dir: str = "outputs/fvd_cache", num_sample_videos: int = 4,
                 feature_extractor: Callable | None = None, extractor_name: str = "i3d-kinetics400",
                 caption_accuracy: bool = False):
        if num_videos < 2 or every_n_steps < 1:
            raise ValueError(f"num_videos={num_videos} and every_n_steps={every_n_steps}; expected >= 2 and >= 1")
        self.eval_root, self.eval_split, self.name = Path(eval_root), eval_split, name
        self.num_videos, self.every_n_steps, self.seed, self.num_steps = num_videos, every_n_steps, seed, num_steps
        self.cache_dir, self.num_sample_videos = Path(cache_dir), num_sample_videos
        self.feature_extractor, self.extractor_name = feature_extractor, extractor_name
        self.caption_accuracy = caption_accuracy
        self.train_seconds = 0.0
        self.eval_seconds = 0.0
        self.flops = FlopMeter()
        self._axis_writers: dict[str, Any] = {}  # sub-runs with an x-axis of their own (see `axis_writer`)
        self._axis_purge: dict[str, int] = {}
        self._clock: float | None = None
        self._last_eval_step = -1
        self._last_value: float | None = None
        self._last_captions: dict[str, float] = {}  # the caption accuracy logged beside _last_value
        self._real: tuple | None = None
        self._captions: list[str] | None = None

    @property
    def tag(self) -> str:
        return f"fvd/{self.name}-{self.num_videos}"

    def state_dict(self) -> dict[str, Any]:
        return {"train_seconds": self.train_seconds, "eval_seconds": self.eval_seconds,
                "last_eval_step": self._last_eval_step, "last_value": self._last_value,
                "last_captions": self._last_captions, "train_flops": self.flops.total}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_seconds = state_dict["train_seconds"]
        self.eval_seconds = state_dict["eval_seconds"]
        self._last_eval_step = state_dict.get("last_eval_step", -1)
        self._last_value = state_dict.get("last_value")
        self._last_captions = state_dict.get("last_captions") or {}
        self.flops.total = state_dict.get("train_flops", 0.0)  # the meter keeps what setup decided

    def gpu_hours(self, trainer: L.Trainer) -> float:
        return self.train_seconds * trainer.num_devices * trainer.num_nodes / 3600

    def axes(self, trainer: L.Trainer) -> dict[str, tuple[str, int]]:
        """The sub-runs with an x-axis of their own: ``{sub-run folder: (tag suffix, x now)}``."""
        return {"gpu_hours": ("@mGPUh", int(round(self.gpu_hours(trainer) * 1000))),
                "flops": ("@GFLOP", int(round(self.flops.total / 1e9)))}

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Check the eval set before training starts, not at the first evaluation thousands of steps in; count
        FLOPs only where every rank computes on whole tensors (one device, DDP) and the backbone is not compiled:
        under sharded strategies the counter would see sharded weights and collectives, so their FLOPs axis stays
        empty."""
        if stage == "fit":
            self.eval_urls()
            from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

            # A compiled backbone runs its graph under the counter's dispatch mode untested: not counted either.
            self.flops.enabled = (type(trainer.strategy) in (SingleDeviceStrategy, DDPStrategy)
                                  and not getattr(pl_module.backbone, "compile", False))

    def eval_urls(self) -> list[str]:
        """The shards of ``eval_split`` listed by ``eval_root``'s manifest; a clear error if there are none."""
        manifest = read_manifest(self.eval_root)
        if manifest is None:
            raise FileNotFoundError(f"FVDCurve: eval_root={str(self.eval_root)!r} has no manifest.json; build the eval "
                                    "shards there first (data/build_msrvtt.py for MSR-VTT, data/make_synthetic.py)")
        splits = manifest.get("splits", {})
        if self.eval_split not in splits:
            raise FileNotFoundError(f"FVDCurve: eval_split={self.eval_split!r} is not in "
                                    f"{self.eval_root / 'manifest.json'}, which has the splits {sorted(splits)}")
        return [str(self.eval_root / s) for s in splits[self.eval_split]["shards"]]

    def frame_step(self, trainer) -> dict[str, Any]:
        """The training data's frame step (``frame_stride`` / ``target_fps``), so real clips have the frame
        rate the model learned to generate."""
        datamodule = getattr(trainer, "datamodule", None)
        return {"frame_stride": getattr(datamodule, "frame_stride", 1),
                "target_fps": getattr(datamodule, "target_fps", None)}

    def on_train_start(self, trainer, pl_module) -> None:
        self._clock = time.perf_counter()
        if trainer.global_step > 0:  # resumed: the GPU-hours and FLOPs axes drop the points past this checkpoint's
            self._axis_purge = {run: x + 1 for run, (_, x) in self.axes(trainer).items()}
            logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
            purged = purge_step_of(logger)  # set by the CLI's resume
            if (purged is not None and purged <= trainer.global_step == self._last_eval_step
                    and self._last_value is not None):
                # The evaluation at the checkpoint's own step was logged before the save, and the step axis's
                # purge on resume (events at >= that step) removed it; it is not evaluated again, so log it again.
                self._log(trainer, self._last_value, None, hours_axis=False, captions=self._last_captions)

    def axis_writer(self, logger: TensorBoardLogger, run: str):
        """The writer of the tags whose x-axis is not steps (GPU-hours, FLOPs): a sub-run of the run folder each.
        Its x-axis needs a purge of its own on resume: the step axis's (events at >= the resumed step) would wipe
        every earlier point whose x exceeds the step count, as milli-GPU-hours on 8 GPUs and GFLOPs soon do."""
        if run not in self._axis_writers:
            from torch.utils.tensorboard import SummaryWriter

            self._axis_writers[run] = SummaryWriter(str(Path(logger.log_dir) / run),
                                                    purge_step=self._axis_purge.get(run))
        return self._axis_writers[run]

    def on_fit_end(self, trainer, pl_module) -> None:
        for writer in self._axis_writers.values():
            writer.close()
        self._axis_writers = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.flops.begin(step_kind(pl_module, batch, batch_idx))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.flops.end(trainer.world_size)
        now = time.perf_counter()
        self.train_seconds += now - (self._clock or now)
        self._clock = now
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step != self._last_eval_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._last_eval_step:
            self.evaluate(trainer, pl_module)

    def _metric(self, device) -> FVD:
        return FVD(self.feature_extractor).to(device)

    def real_clips(self, trainer, pl_module) -> tuple[list[str], torch.Tensor]:
        """Captions and uint8 clips ``(N, T, H, W, 3)`` of the first N eval clips, at the module's shape and the
        training data's frame step."""
        clip = pl_module.settings.clip
        captions, clips = [], []
        for batch in eval_pipeline(self.eval_urls(), clip.num_frames, clip.resolution, 8, **self.frame_step(trainer)):
            captions += batch["caption"]
            clips.append(to_uint8_video(batch["video"]))
            if len(captions) >= self.num_videos:
                break
        if len(captions) < self.num_videos:
            raise ValueError(f"the eval set has {len(captions)} clips; num_videos={self.num_videos} needs as many")
        return captions[: self.num_videos], torch.cat(clips)[: self.num_videos]

    def cache_key(self, trainer, pl_module) -> str:
        manifest = (self.eval_root / "manifest.json").read_bytes()
        clip = pl_module.settings.clip
        step = self.frame_step(trainer)
        resolution = list(clip.resolution) if isinstance(clip.resolution, tuple) else clip.resolution  # as stored
        key = [hashlib.sha1(manifest).hexdigest(), self.eval_split, self.num_videos, clip.num_frames, resolution,
               self.extractor_name]
        if step != {"frame_stride": 1, "target_fps": None}:  # keys of runs at the native rate stay as they were
            key.append(step)
        key = json.dumps(key)
        return hashlib.sha1(key.encode()).hexdigest()[:16]

    def real_statistics(self, trainer, pl_module) -> tuple:
        """The real clips' feature sums, from the disk cache or computed (on rank 0) and cached."""
        path = self.cache_dir / f"{self.name}-{self.cache_key(trainer, pl_module)}.pt"
        captions, clips = self.real_clips(trainer, pl_module)
        self._captions = captions
        if path.is_file():
            stats = torch.load(path, map_location="cpu", weights_only=True)
            return stats["sum"], stats["outer"], stats["count"]
        metric = self._metric(pl_module.device)
        metric.add_features(metric.features(clips.to(pl_module.device)), real=True)
        total, outer, count = (x.cpu() if torch.is_tensor(x) else x for x in metric.real_statistics())
        if trainer.global_rank == 0:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            torch.save({"sum": total, "outer": outer, "count": count}, path)
        return total, outer, count

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        start = time.perf_counter()
        self._last_eval_step = trainer.global_step
        if self._real is None:
            self._real = self.real_statistics(trainer, pl_module)
        metric = self._metric(pl_module.device)
        if trainer.global_rank == 0:  # the sums are added across ranks, so only one rank holds the real ones
            metric.set_real_statistics(*self._real)
        rank, world = data_parallel(trainer)  # the ranks of a context-parallel group sample their clips together
        # Every rank samples the same number of clips (sharded strategies need every rank in every forward);
        # the slots past num_videos on the last round repeat a clip and are not counted.
        slots = [rank + world * j for j in range(-(-self.num_videos // world))]
        indices = [min(k, self.num_videos - 1) for k in slots]
        videos = pl_module.generate([self._captions[k] for k in indices], [self.seed + k for k in indices],
                                    num_steps=self.num_steps)
        frames = to_uint8_video(videos)[torch.tensor([k < self.num_videos for k in slots])]  # (n, T, H, W, 3)
        counted = len(frames) and context_parallel_rank(trainer) == 0  # a group's clips are counted once
        if counted:
            metric.update(frames, real=False)
        value = float(metric.compute())
        captions = self.caption_scores(trainer, frames, [self._captions[k] for k in slots if k < self.num_videos],
                                       counted) if self.caption_accuracy else {}
        self._last_value, self._last_captions = value, captions
        self.eval_seconds += time.perf_counter() - start
        self._log(trainer, value, frames, captions=captions)
        self._clock = time.perf_counter()  # evaluation time is not training time
        return value

    def caption_scores(self, trainer: L.Trainer, frames: torch.Tensor, captions: list[str], counted: bool
                       ) -> dict[str, float]:
        """Colour and direction accuracy of the generated clips against their captions, over every rank's clips,
        with their chance levels."""
        report = caption_accuracy(list(frames.numpy()), captions) if counted and len(frames) else None
        hits = torch.tensor([report["colour_accuracy"] * report["clips"], report["direction_accuracy"] * report["clips"],
                             report["clips"]] if report else [0.0, 0.0, 0.0], dtype=torch.float64)
        if trainer.world_size > 1:
            hits = trainer.strategy.reduce(hits.to(trainer.strategy.root_device), reduce_op="sum").cpu()
        colour, direction, clips = hits.tolist()
        return {"caption/colour_accuracy": colour / clips, "caption/direction_accuracy": direction / clips,
                "caption/colour_chance": COLOUR_CHANCE, "caption/direction_chance": DIRECTION_CHANCE}

    def _log(self, trainer: L.Trainer, value: float, frames: torch.Tensor | None, hours_axis: bool = True,
             captions: dict[str, float] | None = None) -> None:
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if logger is None or trainer.global_rank != 0:
            return
        writer, step = logger.experiment, trainer.global_step
        hours = self.gpu_hours(trainer)
        values = {self.tag: value, **(captions or {})}
        for tag, v in values.items():
            writer.add_scalar(tag, v, step)
        if hours_axis:
            for run, (suffix, x) in self.axes(trainer).items():
                if run == "flops" and not self.flops.total:
                    continue  # not counted (a strategy the counter cannot read)
                axis = self.axis_writer(logger, run)
                for tag, v in values.items():
                    if not tag.endswith("_chance"):
                        axis.add_scalar(f"{tag}{suffix}", v, x)
                axis.flush()
        writer.add_scalar("compute/gpu_hours", hours, step)
        writer.add_scalar("compute/train_tflops", self.flops.total / 1e12, step)
        writer.add_scalar("compute/fvd_eval_hours", self.eval_seconds / 3600, step)
        shown = frames[: self.num_sample_videos].numpy() if frames is not None else []
        if len(shown):
            tiled = side_by_side(list(shown))
            writer.file_writer.add_summary(
                tensorboard_gif_summary(f"fvd_samples/{self.name}", gif_bytes(tiled), *tiled.shape[1:3]), step)
        writer.flush()
