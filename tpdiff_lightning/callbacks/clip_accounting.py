"""Every clip a run could not use is counted once: training clips lost to damaged or truncated shards, and each
evaluation pass's skipped clips against the eval split's size."""

from __future__ import annotations

import warnings

import lightning as L
import torch


class EvalClipsMissingWarning(UserWarning):
    """An evaluation pass covered fewer clips than the eval split holds."""


class ClipAccounting(L.Callback):
    """Counts the clips the data could not deliver.

    Training: the distinct clips (``batch["skipped"]`` names them) that the run has lost so far, however often the
    resampled stream reads a damaged shard again and whichever workers and ranks read it, logged as
    ``data/skipped`` at the end of every epoch and kept in the checkpoint. Evaluation: the clips each validation
    pass delivered and skipped (summed over ranks), logged as ``data/eval_skipped``, with a warning when clips were
    skipped or when delivered plus skipped differs from the manifest's ``num_clips`` of the eval split (a full pass
    only: not with ``limit_val_batches``)."""

    def __init__(self) -> None:
        self.delivered = 0
        self.skipped = 0
        self.lost_training_clips: set[str] = set()

    def state_dict(self) -> dict:
        return {"lost_training_clips": sorted(self.lost_training_clips)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.lost_training_clips = set(state_dict.get("lost_training_clips", []))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if isinstance(batch, dict):
            self.lost_training_clips.update(batch.get("skipped") or [])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        lost = self.lost_training_clips
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            everyone: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(everyone, sorted(lost))  # ranks can lose the same clip
            lost = set().union(*everyone)
        pl_module.log("data/skipped", float(len(lost)), on_step=False, on_epoch=True, sync_dist=False,
                      rank_zero_only=True)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.delivered, self.skipped = 0, 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if isinstance(batch, dict) and "caption" in batch:
            self.delivered += len(batch["caption"])
            if "num_skipped" in batch:
                self.skipped += int(batch["num_skipped"].sum())

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        counts = torch.tensor([self.delivered, self.skipped], dtype=torch.float64, device=pl_module.device)
        delivered, skipped = (int(v) for v in trainer.strategy.reduce(counts, reduce_op="sum").tolist())
        pl_module.log("data/eval_skipped", float(skipped), sync_dist=False, rank_zero_only=True)
        datamodule = getattr(trainer, "datamodule", None)
        expected = datamodule.num_clips("eval") if hasattr(datamodule, "num_clips") else None
        limit = trainer.limit_val_batches  # 1.0 (float) is all batches; the int 1 is one batch
        full_pass = limit is None or (isinstance(limit, float) and limit == 1.0)
        if not trainer.is_global_zero:
            return
        if expected is not None and full_pass and delivered + skipped != expected:
            warnings.warn(f"evaluation saw {delivered} clips and skipped {skipped}, but the eval split holds "
                          f"{expected} (manifest num_clips): {expected - delivered - skipped} clips unaccounted for",
                          EvalClipsMissingWarning, stacklevel=2)
        elif skipped:
            total = f" of {expected}" if expected is not None and full_pass else ""
            warnings.warn(f"evaluation skipped {skipped}{total} clips (damaged or too short); its metrics cover "
                          f"the other {delivered}", EvalClipsMissingWarning, stacklevel=2)
