"""Gradient clipping that works with every optimizer, precision and strategy the project supports.

Lightning clips through the precision plugin, which refuses two combinations that the project's configs use:

- bf16 mixed precision with an optimizer that unscales gradients internally (the fused AdamW): the plugin refuses
  it although bf16 needs no gradient scaler, so there is nothing to unscale and clipping is exact;
- FSDP(1), whose plugin refuses clipping by norm because a per-rank norm over flat shards would be wrong.

``clip_gradients`` picks the method from what is really in play:

==========================================  ==========================================================
in play                                     how the gradients are clipped
==========================================  ==========================================================
DeepSpeed                                   by DeepSpeed itself (Lightning passes ``gradient_clip_val``)
FSDP(1), by norm                            the root FSDP module's ``clip_grad_norm_`` (the global norm
                                            over every rank's shards)
anything else (32-true, bf16, FSDP2, DDP)   ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` over
                                            the optimizer's parameters (FSDP2's DTensor gradients give the
                                            global norm)
==========================================  ==========================================================

Under a gradient scaler (``16-mixed``) the precision plugin has unscaled the gradients before this hook runs, which
needs an optimizer that does not unscale internally: ``tpdiff_lightning.training.optimizer`` never picks the fused AdamW
there, and ``tpdiff_lightning.training.fit_checks`` refuses it at startup when asked for explicitly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer


def uses_gradient_scaler(precision_plugin: Any) -> bool:
    """Whether the precision plugin scales the loss (fp16 mixed precision), so gradients need unscaling."""
    return getattr(precision_plugin, "scaler", None) is not None


def strategy_kind(strategy: Any) -> str:
    """``"deepspeed"``, ``"fsdp1"`` or ``"other"`` for a Lightning strategy object."""
    name = type(strategy).__name__
    mro = {cls.__name__ for cls in type(strategy).__mro__}
    if "DeepSpeedStrategy" in mro or "deepspeed" in name.lower():
        return "deepspeed"
    if "FSDPStrategy" in mro:
        return "fsdp1"
    return "other"


def optimizer_parameters(optimizer: Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def clip_gradients(trainer: Any, optimizer: Optimizer, clip_val: float | None, algorithm: str | None) -> None:
    """Clip the gradients of ``optimizer``'s parameters to ``clip_val`` (by ``"norm"`` or ``"value"``)."""
    if not clip_val or clip_val <= 0:
        return
    algorithm = str(getattr(algorithm, "value", algorithm) or "norm")
    if algorithm not in ("norm", "value"):
        raise ValueError(f"trainer.gradient_clip_algorithm={algorithm!r} is invalid; expected 'norm' or 'value'")
    strategy = trainer.strategy
    kind = strategy_kind(strategy)
    if kind == "deepspeed":
        trainer.precision_plugin.clip_gradients(optimizer, clip_val, algorithm)  # DeepSpeed's own clipping
        return
    params = optimizer_parameters(optimizer)
    if algorithm == "value":
        torch.nn.utils.clip_grad_value_(params, clip_val)
    elif kind == "fsdp1":
        strategy.model.clip_grad_norm_(clip_val)  # the FSDP root: a norm over all ranks' shards
    else:
        torch.nn.utils.clip_grad_norm_(params, clip_val)
