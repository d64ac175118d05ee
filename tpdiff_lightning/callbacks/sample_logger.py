"""Logs sample videos of fixed prompts to TensorBoard as animated GIFs, every N optimizer steps."""

from __future__ import annotations

from typing import Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from tpdiff_lightning.callbacks.visualize import contact_sheet, gif_bytes, side_by_side
from tpdiff_lightning.data.datamodule import DEFAULT_PREDICT_PROMPTS as DEFAULT_PROMPTS


def tensorboard_gif_summary(tag: str, gif: bytes, height: int, width: int):
    """A TensorBoard image summary holding an animated GIF (what ``add_video`` writes, without moviepy)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif)
    return Summary(value=[Summary.Value(tag=tag, image=image)])


class SampleVideoLogger(L.Callback):
    """Samples ``prompts`` with fixed seeds and logs them side by side as one GIF, plus a contact sheet.

    Args:
        every_n_steps: optimizer steps between logs; also logs at the end of fit.
        prompts: captions to sample (default: four synthetic captions).
        seed: seed of the first prompt; prompt k uses ``seed + k``.
        num_steps: sampling steps (default the module's ``sample_steps``).
        fps: GIF frame rate.
    """

    def __init__(self, every_n_steps: int = 500, prompts: Sequence[str] | None = None, seed: int = 0,
                 num_steps: int | None = None, fps: int = 8):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps} is invalid; expected >= 1")
        self.every_n_steps = every_n_steps
        self.prompts = list(prompts) if prompts else list(DEFAULT_PROMPTS)
        self.seed = seed
        self.num_steps = num_steps
        self.fps = fps
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step != self._last_step:
            self.log_samples(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._last_step:
            self.log_samples(trainer, pl_module)

    @torch.no_grad()
    def log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if logger is None:
            return
        # Every rank samples: under sharded strategies (FSDP, ZeRO-3) each forward gathers weights from all
        # ranks, so a rank-0-only forward would hang. Only rank 0 writes.
        seeds = [self.seed + k for k in range(len(self.prompts))]
        video = pl_module.generate(self.prompts, seeds, num_steps=self.num_steps)
        if trainer.global_rank != 0:
            return
        frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1).cpu().numpy()
        tiled = side_by_side(list(frames))  # (F, H, N*W, 3)
        summary = tensorboard_gif_summary("samples/video", gif_bytes(tiled, self.fps), *tiled.shape[1:3])
        writer = logger.experiment
        writer.file_writer.add_summary(summary, trainer.global_step)
        sheet = torch.from_numpy(np.array(contact_sheet(list(frames), self.prompts)))
        writer.add_image("samples/contact_sheet", sheet, trainer.global_step, dataformats="HWC")
        writer.flush()
