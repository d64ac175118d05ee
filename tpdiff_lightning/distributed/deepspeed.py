"""Lightning's DeepSpeed strategy, given its micro-batch size by the data settings.

DeepSpeed needs ``train_micro_batch_size_per_gpu``. Lightning reads it from the training loader's batch sampler,
but the project's webdataset stream batches inside the dataset, so its loader has no batch sampler and Lightning
failed with "'NoneType' object has no attribute 'batch_size'". The micro-batch per device is the data module's
``batch_size`` (clips per device per step); this strategy takes it from there, and from a loader's own
``batch_size`` or batch sampler for other data.

Lightning also warns that an overridden ``configure_gradient_clipping`` "will not actually clip gradients" under
DeepSpeed. TPDiffModule's override leaves clipping to DeepSpeed there (``tpdiff_lightning.training.gradient_clipping``),
and Lightning passes ``gradient_clip_val`` into DeepSpeed's config, so that warning is silenced here.
"""

from __future__ import annotations

import warnings
from typing import Any

from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeedStrategy


def micro_batch_size(trainer: Any) -> int:
    """Clips per device per optimizer micro-step: the data module's ``batch_size``, else the loader's."""
    datamodule = getattr(trainer, "datamodule", None)
    size = getattr(datamodule, "batch_size", None)
    if isinstance(size, int) and size > 0:
        return size
    source = trainer.fit_loop._data_source
    if source.is_defined():
        loader = source.dataloader()
        sampler = getattr(loader, "batch_sampler", None)
        size = getattr(sampler, "batch_size", None) or getattr(loader, "batch_size", None)
        if isinstance(size, int) and size > 0:
            return size
    raise ValueError("DeepSpeed needs the micro-batch size per device, and neither the data module's batch_size "
                     "nor the training loader gives it; set trainer.strategy.init_args.logging_batch_size_per_gpu")


class DeepSpeedStrategy(LightningDeepSpeedStrategy):
    """``lightning.pytorch.strategies.DeepSpeedStrategy`` with the micro-batch size from the data settings."""

    strategy_name = "tpdiff_deepspeed"

    def _auto_select_batch_size(self) -> int:
        return micro_batch_size(self.lightning_module.trainer)

    def init_deepspeed(self) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*DeepSpeed handles gradient clipping internally.*")
            super().init_deepspeed()
