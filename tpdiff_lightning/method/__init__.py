"""The method itself, torch and scipy only (no Lightning): noise schedules, the temporal (and spatio-temporal)
pyramid with its windows, targets and renoise, data-noise alignment, and the stage-by-stage sampler."""

from tpdiff_lightning.method.alignment import align_noise
from tpdiff_lightning.method.pyramid import Stage, TemporalPyramid
from tpdiff_lightning.method.sampling import sample
from tpdiff_lightning.method.schedules import make_schedule

__all__ = ["Stage", "TemporalPyramid", "align_noise", "make_schedule", "sample"]
