"""The divergence guard's measures: one device read per step, NaN reported where it is, no ratio from zero."""

from __future__ import annotations

import math

import torch
from torch import nn

from tpdiff_lightning.callbacks.divergence import DivergenceGuard


class Owner(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.frozen = nn.Linear(3, 3).requires_grad_(False)


def test_measures_are_the_loss_and_the_trainable_weight_norm():
    owner = Owner()
    loss, norm = DivergenceGuard.step_measures(torch.tensor(2.5), owner)
    expected = torch.linalg.vector_norm(torch.cat([p.flatten() for p in owner.a.parameters()]))
    assert loss == 2.5 and math.isclose(norm, float(expected), rel_tol=1e-6)


def test_a_non_finite_weight_is_reported_as_the_weights_not_the_loss():
    owner = Owner()
    with torch.no_grad():
        owner.a.weight[0, 0] = float("inf")
    loss, norm = DivergenceGuard.step_measures(torch.tensor(1.0), owner)
    assert loss == 1.0 and math.isnan(norm)
    assert DivergenceGuard().problem(loss, norm) == "the weights hold non-finite values"


def test_growth_from_an_all_zero_start_is_not_a_divergence():
    guard = DivergenceGuard()
    guard.weight_norm = 0.0  # e.g. a rank whose trainable shard is a zero-initialised LoRA B
    assert guard.problem(1.0, 1e-6) is None
    assert guard.problem(1.0, 1e-6 * 11) is not None  # from a real norm, a 11x jump is still caught
