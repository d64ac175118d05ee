"""The stage-by-stage sampler (paper Sec. 3.6): Euler (flow) or DDIM inside stages, renoise between.

A ``model`` here is any callable ``model(x, t, stage) -> prediction`` with ``x`` of shape
``(B, C, F_i, H, W)``, ``t`` the global time ``(B,)`` in [0, 1] and ``stage`` a
:class:`~tpdiff_lightning.pyramid.Stage`; it predicts the velocity (flow) or the noise (ddim).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from tpdiff_lightning.pyramid import Stage, TemporalPyramid, randn, time_dtype

Denoiser = Callable[[Tensor, Tensor, Stage], Tensor]
StepCallback = Callable[[int, int, Tensor], None]


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
    """Classifier-free guidance: ``pred_uncond + scale * (pred_cond - pred_uncond)``."""

    def model(x: Tensor, t: Tensor, stage: Stage) -> Tensor:
        uncond = model_uncond(x, t, stage)
        return uncond + scale * (model_cond(x, t, stage) - uncond)

    return model


def euler_stage(model: Denoiser, pyramid: TemporalPyramid, x: Tensor, stage: Stage, num_steps: int,
                callback: StepCallback | None = None) -> Tensor:
    """Flow matching inside one stage: Euler in ``u`` from 1 to 0 with ``v = model(x, t)``."""
    us = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    for n in range(num_steps):
        t = pyramid.stage_time(stage.index, us[n]).to(x.device, time_dtype(x)).expand(x.shape[0])  # (B,)
        v = model(x, t, stage)
        x = x + float(us[n + 1] - us[n]) * v
        if callback is not None:
            callback(stage.index, n, x)
    return x


def ddim_stage(model: Denoiser, pyramid: TemporalPyramid, x: Tensor, stage: Stage, num_steps: int,
               callback: StepCallback | None = None) -> Tensor:
    """Deterministic DDIM inside one stage, from ``s_i`` to ``e_i``: ``x' = gamma' x_bar + sigma' eps``."""
    ts = torch.linspace(stage.t_start, stage.t_end, num_steps + 1, dtype=torch.float64)
    gammas, sigmas = pyramid.schedule.gamma_sigma(ts)
    for n in range(num_steps):
        t = ts[n].to(x.device, time_dtype(x)).expand(x.shape[0])  # (B,)
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
    generator: torch.Generator | None = None,
    renoise: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    callback: StepCallback | None = None,
) -> Tensor:
    """Sample full-rate clips through every stage of the pyramid.

    Args:
        model: denoiser ``(x, t, stage) -> prediction``.
        pyramid: the pyramid; its ``num_frames`` sets the output length.
        batch_size: B.
        sample_shape: ``(C, H, W)`` of one frame.
        num_steps: total steps, split over stages in proportion to the partition.
        generator: seeds the initial noise and every renoise draw.
        renoise: False gives the paper's ablation (upsample and scale only).
    Returns:
        ``(B, C, F, H, W)`` samples at the schedule's data end.
    """
    C, H, W = sample_shape
    first = pyramid.stages[0]
    _, sigma_start = pyramid.schedule.scalar(first.t_start)
    z = randn((batch_size, C, first.num_frames, H, W), generator, device, dtype)
    x = sigma_start * z  # (B, C, F_0, H, W)
    stage_step = euler_stage if pyramid.schedule.name == "flow" else ddim_stage
    for stage, steps in zip(pyramid.stages, split_steps(num_steps, pyramid.partition)):
        x = stage_step(model, pyramid, x, stage, steps, callback)
        if stage.index < pyramid.num_stages - 1:
            x = pyramid.renoise(x, stage.index, generator=generator, enabled=renoise)  # (B, C, F_{i+1}, H, W)
    return x
