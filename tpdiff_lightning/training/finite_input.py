"""A training batch with non-finite values is reported by step, stage and the offending samples' keys."""

from __future__ import annotations

from typing import Sequence

import torch


class NonFiniteInputError(ValueError):
    """A training batch holds NaN or infinite values."""


def finite_rows(x0: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool on ``x0``'s device: which samples of ``x0 (B, ...)`` are finite throughout (no host read)."""
    return torch.isfinite(x0.reshape(x0.shape[0], -1)).all(dim=1)


def check_finite_input(x0: torch.Tensor, keys: Sequence[str] | None, step: int, stage: int) -> None:
    """Raise :class:`NonFiniteInputError` naming the step, the stage and the keys of the samples of ``x0``
    ``(B, ...)`` that hold a non-finite value."""
    finite = finite_rows(x0)  # (B,)
    if bool(finite.all()):
        return
    rows = (~finite).nonzero().flatten().tolist()
    names = [str(keys[r]) if keys is not None and r < len(keys) else f"batch row {r}" for r in rows]
    raise NonFiniteInputError(
        f"training input has non-finite values at global_step={step}, stage {stage}, in sample(s) "
        f"{', '.join(names)}; expected finite clips: check or remove these samples")
