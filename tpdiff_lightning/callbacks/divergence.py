"""Stops a diverging run before its state reaches a checkpoint: loss explosions and blown-up weights."""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

import lightning as L
import torch


class TrainingDivergedError(RuntimeError):
    """The training loss or the weights exploded; the step that did it was not checkpointed."""


class DivergenceGuard(L.Callback):
    """After every training batch, and before any ``ModelCheckpoint`` (Lightning runs checkpoint callbacks
    last), stop the run when

    - the loss is not finite, or larger than ``loss_factor`` times the median of the last ``window`` losses
      (checked once ``min_history`` losses are known), or
    - the trainable weights hold a non-finite value, or their norm grew more than ``max_weight_growth`` times
      in one step (a learning rate far too high blows the weights up before the loss shows it).

    The error names the step, the loss and the median, so the diverged state is never saved. The loss history
    is part of the callback's state, so a resumed run keeps its median.

    Args:
        loss_factor: a loss this many times the running median is an explosion (default 100).
        window: number of recent losses the median is taken over.
        min_history: losses needed before the loss test applies (the first steps of a run drop fast).
        max_weight_growth: largest allowed ratio of the weight norm after a step to the norm before it.
    """

    def __init__(self, loss_factor: float = 100.0, window: int = 200, min_history: int = 20,
                 max_weight_growth: float = 10.0):
        if not loss_factor > 1:
            raise ValueError(f"loss_factor={loss_factor} is invalid; expected a number > 1")
        if window < 1 or min_history < 1:
            raise ValueError(f"window={window}, min_history={min_history} are invalid; expected both >= 1")
        if not max_weight_growth > 1:
            raise ValueError(f"max_weight_growth={max_weight_growth} is invalid; expected a number > 1")
        self.loss_factor, self.min_history, self.max_weight_growth = loss_factor, min_history, max_weight_growth
        self.losses: deque[float] = deque(maxlen=window)
        self.weight_norm: float | None = None

    @staticmethod
    def step_measures(loss: torch.Tensor, pl_module: L.LightningModule) -> tuple[float, float]:
        """``(loss, norm of the trainable weights)`` of this rank, the largest over all ranks, read from the
        device in one transfer (one host sync per step; NaN or inf on any rank reads as NaN)."""
        # Sharded (DTensor) weights: each rank measures its own shard.
        local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach()
                 for p in pl_module.parameters() if p.requires_grad]
        local = [t for t in local if t.numel()]
        device = loss.device
        norm = (torch.linalg.vector_norm(torch.stack([n.float().to(device) for n in torch._foreach_norm(local)]))
                if local else torch.zeros((), device=device))
        values = torch.stack([loss.detach().float().reshape(()), norm])  # (2,)
        bad = (~torch.isfinite(values)).float()  # (2,): which of the two is not finite
        measures = torch.cat([torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0), bad])  # (4,)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(measures, op=torch.distributed.ReduceOp.MAX)  # every rank decides alike
        loss_value, norm_value, bad_loss, bad_norm = measures.tolist()
        return (math.nan if bad_loss else loss_value), (math.nan if bad_norm else norm_value)

    def problem(self, loss: float, weight_norm: float) -> str | None:
        """What is wrong with this step, or ``None``; records the step when nothing is."""
        if not math.isfinite(loss):
            return f"the training loss is {loss}"
        if len(self.losses) >= self.min_history:
            median = statistics.median(self.losses)
            if loss > self.loss_factor * median:
                return (f"the training loss {loss:.4g} is more than loss_factor={self.loss_factor:g} times the "
                        f"median {median:.4g} of the last {len(self.losses)} steps")
        if not math.isfinite(weight_norm):
            return "the weights hold non-finite values"
        grown = self.weight_norm is not None and self.weight_norm > 1e-12  # an all-zero start (a LoRA B shard) has no ratio
        if grown and weight_norm > self.max_weight_growth * self.weight_norm:
            return (f"the weight norm grew from {self.weight_norm:.4g} to {weight_norm:.4g} in one step "
                    f"(more than max_weight_growth={self.max_weight_growth:g} times)")
        self.losses.append(loss)
        self.weight_norm = weight_norm
        return None

    def on_train_start(self, trainer, pl_module) -> None:
        # the weights the first step starts from
        self.weight_norm = self.step_measures(torch.zeros((), device=pl_module.device), pl_module)[1]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        problem = self.problem(*self.step_measures(loss, pl_module))  # the same values, so the same, on every rank
        if problem is not None:
            where = problem
            raise TrainingDivergedError(
                f"training diverged at global_step={trainer.global_step}: {where}. Nothing of this step was "
                "checkpointed; lower the learning rate (model.init_args.optimization.lr) or resume from an earlier checkpoint")

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "weight_norm": self.weight_norm}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.losses.clear()
        self.losses.extend(state_dict.get("losses", []))
        self.weight_norm = state_dict.get("weight_norm")
