"""The LightningModule that trains one backbone over every stage of the pyramid, its typed settings, and what only
it uses: the weight EMA, the optimizer, gradient clipping and the checks of its inputs and setup."""

from tpdiff_lightning.training.module import TPDiffModule
from tpdiff_lightning.training.settings import (
    ClipSettings,
    ObjectiveSettings,
    OptimizationSettings,
    PyramidSettings,
    SamplingSettings,
)

__all__ = ["ClipSettings", "ObjectiveSettings", "OptimizationSettings", "PyramidSettings", "SamplingSettings",
           "TPDiffModule"]
