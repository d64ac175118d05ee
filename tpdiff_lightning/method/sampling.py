"""The stage-by-stage sampler (paper Sec. 3.6): Euler (flow) or DDIM inside stages, renoise between.

A ``model`` here is any callable ``model(x, t, stage) -> prediction`` with ``x`` of shape
``(B, C, F_i, H / P_i, W / P_i)`` (``P_i = 1`` in a temporal pyramid), ``t`` the global time ``(B,)`` in [0, 1] and ``stage`` a
:class:`~tpdiff_lightning.method.pyramid.Stage`; it predicts the velocity (flow, in the time the pyramid's
``flow_velocity`` names) or the noise (ddim).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from tpdiff_lightning.method.pyramid import Generators, Stage, TemporalPyramid, randn, time_dtype
from tpdiff_lightning.method.values import is_number

Denoiser = Callable[[Tensor, Tensor, Stage], Tensor]
StepCallback = Callable[[int, int, Tensor], None]


def check_step_weights(weights: Sequence[float] | None, num_stages: int) -> None:
    """``sample_step_weights`` must be ``None`` (follow the partition) or one positive number per stage."""
    if weights is None:
        return
    values = list(weights)
    if len(values) != num_stages or not all(is_number(w) and w > 0 for w in values):
        raise ValueError(f"step_weights={values} is invalid; expected {num_stages} positive numbers "
                         "(one per stage), or null to split the steps by the partition")


def split_steps(total: int, partition: Sequence[float]) -> list[int]:
    """Split ``total`` steps over stages in proportion to ``partition``, at least one each (largest remainder)."""
    K = len(partition)
    if total < K:
        raise ValueError(f"num_steps={total} is too few for {K} stages; expected at least {K}")
    weights = [w / sum(partition) for w in partition]
    exact = [max(1.0, total * w) for w in weights]
    steps = [max(1, int(e)) for e in exact]
    order = sorted(range(K), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    k = 0
    while sum(steps) < total:
        steps[order[k % K]] += 1
        k += 1
    while sum(steps) > total:
        largest = max(range(K), key=lambda i: steps[i])
        steps[largest] -= 1
    return steps


def guided(model_cond: Denoiser, model_uncond: Denoiser, scale: float) -> Denoiser:
    """Classifier-free guidance: ``pred_uncond + scale * (pred_cond - pred_uncond)``, two forward passes."""

    def model(x: Tensor, t: Tensor, stage: Stage) -> Tensor:
        uncond = model_uncond(x, t, stage)
        return uncond + scale * (model_cond(x, t, stage) - uncond)

    return model


def guided_one_pass(model_pair: Denoiser, scale: float) -> Denoiser:
    """Classifier-free guidance in one forward pass over a doubled batch.

    ``model_pair`` gets ``(2B, ...)``: rows ``0..B-1`` are read as conditional, rows ``B..2B-1`` as
    unconditional (the caller closes over captions laid out that way). The result equals :func:`guided`.
    """

    def model(x: Tensor, t: Tensor, stage: Stage) -> Tensor:
        cond, uncond = model_pair(torch.cat([x, x]), torch.cat([t, t]), stage).chunk(2)  # (B, ...) each
        return uncond + scale * (cond - uncond)

    return model


def shift_time(t: Tensor, shift: float) -> Tensor:
    """Timestep shift ``t -> k t / (1 + (k - 1) t)``: k > 1 spends more steps at high noise; 0 and 1 stay."""
    return shift * t / (1 + (shift - 1) * t)


def unshift_time(t: Tensor, shift: float) -> Tensor:
    """Inverse of :func:`shift_time`: ``t -> t / (k - (k - 1) t)``."""
    return t / (shift - (shift - 1) * t)


def stage_time_grid(stage: Stage, num_steps: int, shift: float = 1.0) -> Tensor:
    """``num_steps + 1`` global times from ``s_i`` to ``e_i`` (float64).

    Uniform without a shift. With a shift k the grid is uniform in the unshifted time and mapped through
    :func:`shift_time`, between the pre-images of ``s_i`` and ``e_i``: the steps crowd towards the noisy
    end as in a shifted single-stage sampler, and the stage window itself does not move. At K = 1 this is
    ``shift_time(linspace(1, 0, N + 1))``.
    """
    if shift == 1.0:
        return torch.linspace(stage.t_start, stage.t_end, num_steps + 1, dtype=torch.float64)
    ends = unshift_time(torch.tensor([stage.t_start, stage.t_end], dtype=torch.float64), shift)
    grid = shift_time(torch.linspace(float(ends[0]), float(ends[1]), num_steps + 1, dtype=torch.float64), shift)
    grid[0], grid[-1] = stage.t_start, stage.t_end  # exact window ends despite rounding
    return grid


def euler_stage(model: Denoiser, pyramid: TemporalPyramid, x: Tensor, stage: Stage, num_steps: int,
                callback: StepCallback | None = None, shift: float = 1.0) -> Tensor:
    """Flow matching inside one stage, from ``s_i`` to ``e_i``.

    Stage-time velocity (paper): Euler in ``u`` from 1 to 0, ``x += (u' - u) v``. Global-time velocity:
    Euler in ``t``, ``x += (t' - t) v``. On the same grid the two give the same iterates for models whose
    predictions differ by the factor ``s_i - e_i``.
    """
    if shift == 1.0:
        us = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    else:
        ts = stage_time_grid(stage, num_steps, shift)
        us = (ts - stage.t_end) / (stage.t_start - stage.t_end)
    span = pyramid.velocity_span(stage.index)  # dt/du for the global-time velocity, else 1
    ts = pyramid.stage_time(stage.index, us).to(x.device, time_dtype(x))  # (N + 1,): one copy per stage, not per step
    for n in range(num_steps):
        t = ts[n].expand(x.shape[0])  # (B,)
        v = model(x, t, stage)
        x = x + float((us[n + 1] - us[n]) * span) * v
        if callback is not None:
            callback(stage.index, n, x)
    return x


def ddim_stage(model: Denoiser, pyramid: TemporalPyramid, x: Tensor, stage: Stage, num_steps: int,
               callback: StepCallback | None = None) -> Tensor:
    """Deterministic DDIM inside one stage, from ``s_i`` to ``e_i``: ``x' = gamma' x_bar + sigma' eps``."""
    ts = torch.linspace(stage.t_start, stage.t_end, num_steps + 1, dtype=torch.float64)
    gammas, sigmas = pyramid.schedule.gamma_sigma(ts)
    ts_device = ts.to(x.device, time_dtype(x))  # (N + 1,): one copy per stage, not per step
    for n in range(num_steps):
        t = ts_device[n].expand(x.shape[0])  # (B,)
        eps = model(x, t, stage)
        x_bar = (x - float(sigmas[n]) * eps) / float(gammas[n])
        x = float(gammas[n + 1]) * x_bar + float(sigmas[n + 1]) * eps
        if callback is not None:
            callback(stage.index, n, x)
    return x


def sample(
    model: Denoiser,
    pyramid: TemporalPyramid,
    batch_size: int,
    sample_shape: Sequence[int],
    num_steps: int = 30,
    generator: Generators = None,
    renoise: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    callback: StepCallback | None = None,
    timestep_shift: float = 1.0,
    step_weights: Sequence[float] | None = None,
) -> Tensor:
    """Sample full-rate clips through every stage of the pyramid.

    Args:
        model: denoiser ``(x, t, stage) -> prediction``.
        pyramid: the pyramid; its ``num_frames`` sets the output length.
        batch_size: B.
        sample_shape: ``(C, H, W)`` of one full-resolution frame; a spatio-temporal pyramid starts at
            ``(H / P_0, W / P_0)``.
        num_steps: total steps, split over stages in proportion to the partition.
        generator: seeds the initial noise and every renoise draw; a sequence of B generators seeds each
            sample by its own, so a batch equals its samples drawn one at a time.
        renoise: False gives the paper's ablation (upsample and scale only).
        timestep_shift: flow only; ``k`` reshapes the step grid inside each stage by ``t -> k t / (1 + (k-1) t)``
            without moving the stage windows (1 = uniform grid).
        step_weights: the steps' split over stages (relative, one per stage); default the partition, i.e. the
            same step size in every stage. Stage i still covers its own window ``[s_i, e_i]``, in its share of
            steps: ``[2, 2, 1]`` spends 2/5 of the steps in each cheap early stage and 1/5 at full size.
    Returns:
        ``(B, C, F, H, W)`` samples at the schedule's data end.
    """
    if not (is_number(timestep_shift) and timestep_shift > 0):
        raise ValueError(f"timestep_shift={timestep_shift!r} is invalid; expected a number > 0 (1 = no shift)")
    if timestep_shift != 1.0 and pyramid.schedule.name != "flow":
        raise ValueError(f"timestep_shift={timestep_shift!r} is set for schedule={pyramid.schedule.name!r}; "
                         "expected 1 (the shift applies to flow sampling only)")
    check_step_weights(step_weights, pyramid.num_stages)
    C, H, W = sample_shape
    first = pyramid.stages[0]
    _, sigma_start = pyramid.schedule.scalar(first.t_start)
    z = randn((batch_size, C, first.num_frames, *pyramid.stage_size(H, W, 0)), generator, device, dtype)
    x = sigma_start * z  # (B, C, F_0, H / P_0, W / P_0)
    split = split_steps(num_steps, pyramid.partition if step_weights is None else step_weights)
    for stage, steps in zip(pyramid.stages, split):
        if pyramid.schedule.name == "flow":
            x = euler_stage(model, pyramid, x, stage, steps, callback, timestep_shift)
        else:
            x = ddim_stage(model, pyramid, x, stage, steps, callback)
        if stage.index < pyramid.num_stages - 1:
            x = pyramid.renoise(x, stage.index, generator=generator, enabled=renoise)  # stage i+1's shape
    return x
