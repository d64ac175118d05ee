"""The model's settings in typed groups: what the clip is, how the pyramid is shaped, what is trained, how it is
optimized and how it samples. Each group is a frozen dataclass whose attribute docstrings are the command line's
help (``fit --help``); YAML nests them under ``model.init_args.<group>``.

A value is checked where it is given, and a bad one is one line naming its full key
(``model.init_args.optimization.lr=-1.0 is invalid; expected a learning rate > 0``). Settings that need another
group to be checked (``sampling.steps`` against ``pyramid.num_stages``) are checked by the module.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from dataclasses import asdict, dataclass, fields
from functools import cache
from typing import Any, Sequence

from tpdiff_lightning.method.pyramid import FLOW_VELOCITIES
from tpdiff_lightning.method.schedules import BETA_SCHEDULES, SCHEDULES
from tpdiff_lightning.method.values import is_integer, is_number

PREFIX = "model.init_args."


def invalid(key: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"{PREFIX}{key}={value!r} is invalid; expected {expected}")


@dataclass(frozen=True)
class ClipSettings:
    """The clip the model is built for. The CLI links both from the data (``data.init_args``)."""

    num_frames: int = 16
    """Full-rate video frames per clip (linked from ``data.init_args.num_frames``)."""
    resolution: int | tuple[int, int] = 32
    """Frame size: an int (square) or ``[height, width]`` (linked from ``data.init_args.resolution``)."""

    def __post_init__(self) -> None:
        if not (is_integer(self.num_frames) and self.num_frames >= 1):
            raise invalid("clip.num_frames", self.num_frames, "an integer >= 1")


@dataclass(frozen=True)
class PyramidSettings:
    """The shape of the pyramid, in denoising order (stage 0 is the noisiest, with the lowest frame rate)."""

    num_stages: int = 3
    """Number of stages K; 1 is vanilla diffusion."""
    reductions: tuple[int, ...] | None = None
    """Frame-rate factor between consecutive stages, K - 1 values (default all 2)."""
    spatial_reductions: tuple[int, ...] | None = None
    """Spatial factor per side between consecutive stages, K - 1 values (default all 1: the temporal pyramid). A
    transition with a spatial factor above 1 may keep the frame rate (its ``reductions`` entry 1). The backbone's
    forward must take ``spatial_stride`` (VideoDiT, Wan, Flux-style and AnimateDiff do)."""
    partition: tuple[float, ...] | None = None
    """Relative time span of each stage (default uniform)."""
    stage_weights: tuple[float, ...] | None = None
    """Training probability of each stage (default proportional to ``partition``: uniform over global time)."""
    anchor_first_frame: bool = False
    """Keep frame 0 outside the stride, for causal video VAEs whose latents have 1 + 4k frames (Wan)."""

    def __post_init__(self) -> None:
        if not (is_integer(self.num_stages) and self.num_stages >= 1):
            raise invalid("pyramid.num_stages", self.num_stages, "an integer >= 1")


@dataclass(frozen=True)
class ObjectiveSettings:
    """What is trained: the noise schedule, the target, the data-noise pairing and the stage draw."""

    schedule: str = "flow"
    """``flow`` (flow matching, velocity target) or ``ddim`` (the SD1.5 schedule, noise target)."""
    beta_schedule: str | None = None
    """``ddim`` only: ``scaled_linear`` (SD1.5, the default when null) or ``linear`` (AnimateDiff's training
    schedule), both from 0.00085 to 0.012 over 1000 steps."""
    flow_velocity: str = "stage"
    """``flow`` only: ``stage`` (the paper's Eq. 13) trains the velocity in the stage's own time, ``global`` the
    velocity in global time, which a pretrained flow model (Wan, Flux) predicts. Sampling follows the same choice."""
    alignment: bool = True
    """Pair data and noise by the Hungarian algorithm per batch (paper Algorithm 1)."""
    alignment_scope: str = "local"
    """``local`` aligns each rank's micro-batch; ``global`` the whole global batch across data-parallel ranks."""
    caption_dropout: float = 0.1
    """Probability of training on an empty caption, for classifier-free guidance."""
    stage_seed: int = 0
    """Seed of the per-step stage draw (and of the noise, positions and caption dropout)."""
    stage_sync: bool = True
    """Every rank draws the same stage at the same step, so no rank waits for a longer sequence; false draws the
    stage per rank (for comparison)."""

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"{PREFIX}objective.schedule={self.schedule!r} is unknown; expected one of "
                             f"{sorted(SCHEDULES)}")
        if self.beta_schedule is not None and self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"{PREFIX}objective.beta_schedule={self.beta_schedule!r} is unknown; expected one of "
                             f"{list(BETA_SCHEDULES)}")
        if self.flow_velocity not in FLOW_VELOCITIES:
            raise ValueError(f"{PREFIX}objective.flow_velocity={self.flow_velocity!r} is invalid; expected one of "
                             f"{list(FLOW_VELOCITIES)}")
        if self.alignment_scope not in ("local", "global"):
            raise invalid("objective.alignment_scope", self.alignment_scope, "'local' or 'global'")
        if not (is_number(self.caption_dropout) and 0 <= self.caption_dropout < 1):
            raise invalid("objective.caption_dropout", self.caption_dropout, "0 <= p < 1")
        if self.alignment_scope == "global" and not self.stage_sync:
            raise ValueError(f"{PREFIX}objective.alignment_scope='global' needs {PREFIX}objective.stage_sync=true: "
                             "ranks on different stages hold latents of different frame counts, which one global "
                             "assignment cannot pair")


@dataclass(frozen=True)
class OptimizationSettings:
    """AdamW, its schedule and the weight EMA. These may change when a run resumes (applied and said)."""

    lr: float = 3e-4
    """Peak learning rate."""
    text_lr_scale: float = 1.0
    """Learning-rate factor for a trainable text encoder (a from-scratch encoder may need more)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas, each in [0, 1)."""
    warmup_steps: int = 100
    """Linear learning-rate warmup, in optimizer steps."""
    fused_optimizer: bool | None = None
    """Torch's fused AdamW kernel; null uses it wherever it is safe (not under fp16 precision, DeepSpeed or
    sharded DTensor parameters)."""
    ema_decay: float | None = 0.999
    """Decay of the weight EMA used for sampling; null disables it."""

    def __post_init__(self) -> None:
        if not (is_number(self.lr) and self.lr > 0):
            raise invalid("optimization.lr", self.lr, "a learning rate > 0")
        if not (is_number(self.text_lr_scale) and self.text_lr_scale > 0):
            raise invalid("optimization.text_lr_scale", self.text_lr_scale, "a number > 0")
        if not (is_number(self.weight_decay) and self.weight_decay >= 0):
            raise invalid("optimization.weight_decay", self.weight_decay, "a number >= 0 (0: none)")
        betas = list(self.betas) if isinstance(self.betas, (list, tuple)) else self.betas
        if not (isinstance(betas, list) and len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas)):
            raise invalid("optimization.betas", betas, "two numbers in [0, 1), e.g. [0.9, 0.999]")
        if not (is_integer(self.warmup_steps) and self.warmup_steps >= 0):
            raise invalid("optimization.warmup_steps", self.warmup_steps, "an integer >= 0 (0: no warmup)")
        if self.ema_decay is not None and not (is_number(self.ema_decay) and 0 <= self.ema_decay < 1):
            raise invalid("optimization.ema_decay", self.ema_decay, "a number in [0, 1), or null for no EMA")


@dataclass(frozen=True)
class SamplingSettings:
    """How ``generate``, ``predict`` and the sample and FVD callbacks sample. These may change for a checkpoint."""

    steps: int = 30
    """Total sampling steps, split over the stages by the partition (or ``step_weights``), at least one each."""
    step_weights: tuple[float, ...] | None = None
    """Relative sampling steps per stage (default null: by the partition, one step size throughout). ``[2, 2, 1]``
    is PyramidalWan's 20-20-10: more steps in the cheap early stages; each stage still covers its own window."""
    guidance_scale: float = 1.0
    """Classifier-free guidance weight; 1 is none, 0 unconditional."""
    renoise: bool = True
    """Add the corrective noise between stages (false is the paper's ablation)."""
    timestep_shift: float = 1.0
    """Flow only: ``k`` reshapes the step grid inside each stage by ``t -> k t / (1 + (k - 1) t)`` without moving
    the stage windows (Wan2.1 1.3B samples with 5 to 8); 1 is the uniform grid."""
    num_frames: int | None = None
    """Video frames to generate (default the clip's; more is zero-shot long video)."""
    batch_size: int = 8
    """Clips sampled together by ``generate``; with guidance each forward holds twice as many. Seeds give the same
    clips at any value."""

    def __post_init__(self) -> None:
        if not (is_integer(self.steps) and self.steps >= 1):
            raise invalid("sampling.steps", self.steps, "an integer of at least one step per stage")
        if self.step_weights is not None and not all(is_number(w) and w > 0 for w in self.step_weights):
            raise invalid("sampling.step_weights", list(self.step_weights), "positive numbers, one per stage, or "
                          "null to split the steps by the partition")
        if not (is_number(self.guidance_scale) and self.guidance_scale >= 0):
            raise invalid("sampling.guidance_scale", self.guidance_scale, ">= 0 (1: no guidance, 0: unconditional)")
        if not (is_number(self.timestep_shift) and self.timestep_shift > 0):
            raise invalid("sampling.timestep_shift", self.timestep_shift, "a number > 0 (1 = no shift)")
        if self.num_frames is not None and not (is_integer(self.num_frames) and self.num_frames >= 1):
            raise invalid("sampling.num_frames", self.num_frames, "an integer >= 1, or null for the clip's")
        if not (is_integer(self.batch_size) and self.batch_size >= 1):
            raise invalid("sampling.batch_size", self.batch_size, "an integer >= 1")


GROUPS: dict[str, type] = {"clip": ClipSettings, "pyramid": PyramidSettings, "objective": ObjectiveSettings,
                           "optimization": OptimizationSettings, "sampling": SamplingSettings}
"""The module's settings groups: ``model.init_args.<name>``."""
RESUMABLE_GROUPS = ("optimization", "sampling")
"""Groups a resumed run may change (the others define what the checkpoint trains)."""
INFERENCE_GROUPS = ("sampling",)
"""Groups ``validate`` and ``predict`` may set for a checkpoint."""


@dataclass(frozen=True)
class ModuleSettings:
    """All of a module's settings groups."""

    clip: ClipSettings
    pyramid: PyramidSettings
    objective: ObjectiveSettings
    optimization: OptimizationSettings
    sampling: SamplingSettings

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """Plain dicts and lists, as they are stored in a checkpoint's hyperparameters and nested in YAML."""
        return {name: plain(getattr(self, name)) for name in GROUPS}


def plain(settings: Any) -> dict[str, Any]:
    """A settings dataclass as a dict of plain values (tuples as lists), the form YAML and checkpoints hold."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()}


def as_settings(cls: type, value: Any):
    """``value`` as a ``cls`` dataclass: an instance is kept, a dict (a checkpoint's hyperparameters, a caller's
    keyword arguments) is built into one, None gives the defaults."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            group = next(name for name, c in GROUPS.items() if c is cls)
            raise ValueError(f"{PREFIX}{group}.{unknown[0]} is not a setting; expected one of {sorted(known)}")
        return cls(**value)
    raise TypeError(f"expected a {cls.__name__} or a dict, got {type(value).__name__}")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's attribute docstring (the string right below it in the class body), one line each."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def settings_help() -> str:
    """Every model setting as ``model.init_args.<group>.<field> (default): doc``, for ``fit --help``."""
    lines = []
    for name, cls in GROUPS.items():
        lines.append(f"{name}: {' '.join(cls.__doc__.split())}")
        for f in fields(cls):
            default = f.default if not isinstance(f.default, tuple) else list(f.default)
            shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else default
            lines.append(f"  --{PREFIX}{name}.{f.name} (default: {shown}): "
                         f"{field_docs(cls).get(f.name, '')}")
    return "\n".join(lines)


_BARE_KEY = re.compile(r"^([a-z_]+)=")
FIELD_GROUP = {f.name: group for group, cls in GROUPS.items() for f in fields(cls)
               if f.name not in ("num_frames",)}  # num_frames is both a clip and a sampling field: never guessed


def qualify(message: str) -> str:
    """A method-level error (``reductions=[2] has length 1; ...``) with its key as the user types it
    (``model.init_args.pyramid.reductions=[2] has length 1; ...``); other messages are returned unchanged."""
    match = _BARE_KEY.match(message)
    if match and match.group(1) in FIELD_GROUP:
        return f"{PREFIX}{FIELD_GROUP[match.group(1)]}.{message}"
    return message


def sequence(value: Sequence[Any] | None) -> tuple | None:
    return tuple(value) if value is not None else None
