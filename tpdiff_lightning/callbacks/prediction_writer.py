"""Writes generated clips as playable mp4 files and a PNG contact sheet."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Sequence

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from tpdiff_lightning.callbacks.visualize import save_contact_sheet
from tpdiff_lightning.data.ranks import context_parallel_rank, data_parallel
from tpdiff_lightning.data.video_io import write_mp4

log = logging.getLogger("lightning.pytorch.callbacks.prediction_writer")  # shown on the console, as Lightning's own


def slug(text: str, limit: int = 48) -> str:
    """A file-name-safe version of a caption."""
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:limit] or "empty"


class VideoPredictionWriter(BasePredictionWriter):
    """Saves each predicted clip as ``<output_dir>/<index>_<caption>_seed<seed>_rank<r>.mp4``.

    Args:
        output_dir: folder for the mp4 files and ``contact_sheet_rank<r>.png``; ``None`` is ``<trainer.log_dir>/predictions``.
        fps: frame rate written into the mp4 files.
        contact_sheet: also write a PNG with one row per clip at the end.
    """

    def __init__(self, output_dir: str | None = None, fps: int = 8, contact_sheet: bool = True):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir) if output_dir else None
        self.fps = fps
        self.contact_sheet = contact_sheet
        self._videos: list = []
        self._captions: list[str] = []
        self.written: list[Path] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.output_dir is None:
            self.output_dir = Path(trainer.log_dir or trainer.default_root_dir) / "predictions"

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: dict[str, Any],
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        if context_parallel_rank(trainer) != 0:
            return  # the ranks of a context-parallel group sampled the same clips together: one writes them
        self.output_dir.mkdir(parents=True, exist_ok=True)
        rank = data_parallel(trainer)[0]
        for video, caption, seed, index in zip(prediction["video"], prediction["caption"], prediction["seed"],
                                               prediction["index"]):
            frames = video.numpy()  # (F, H, W, 3) uint8
            path = self.output_dir / f"{index:04d}_{slug(caption)}_seed{seed}_rank{rank}.mp4"
            write_mp4(path, frames, fps=self.fps)
            self.written.append(path)
            if self.contact_sheet:
                self._videos.append(frames)
                self._captions.append(caption)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if context_parallel_rank(trainer) != 0:
            return
        replica, replicas = data_parallel(trainer)
        sheet = None
        if self.contact_sheet and self._videos:
            sheet = save_contact_sheet(self.output_dir / f"contact_sheet_rank{replica}.png", self._videos,
                                       self._captions)
            self.written.append(sheet)
        clips = sum(path.suffix == ".mp4" for path in self.written)
        rank = f"rank {replica} " if replicas > 1 else ""
        log.info(f"predict: {rank}wrote {clips} clip{'s' if clips != 1 else ''} to {self.output_dir}"
                 + (f" and a contact sheet, {sheet.name}" if sheet is not None else ""))
        self._videos, self._captions = [], []
