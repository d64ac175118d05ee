"""Noise schedules on continuous time: ``x_t = gamma_t * x0 + sigma_t * eps`` (paper Eq. 6).

Legend: ``t`` in [0, 1] with ``t = 1`` pure noise; ``gamma`` scales the data, ``sigma`` the
noise; ``lam`` is the half log-SNR ``ln(gamma / sigma)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class GammaSigma(NamedTuple):
    """The two coefficients of ``x_t``; unpacks like a ``(gamma, sigma)`` tuple."""

    gamma: Tensor
    sigma: Tensor


class Schedule:
    """A schedule maps continuous time to ``(gamma, sigma)`` and back through the log-SNR."""

    name: str = ""
    timestep_scale: float = 1.0
    """Factor from continuous ``t`` to the timestep value the backbone is told."""

    def gamma_sigma(self, t: Tensor) -> GammaSigma:
        raise NotImplementedError

    def log_snr(self, t: Tensor) -> Tensor:
        """Half log-SNR ``lam = ln(gamma_t / sigma_t)``; decreasing in t."""
        raise NotImplementedError

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        """Inverse of :meth:`log_snr`."""
        raise NotImplementedError

    def snr(self, t: Tensor) -> Tensor:
        """``SNR(t) = gamma_t^2 / sigma_t^2``."""
        gamma, sigma = self.gamma_sigma(t)
        return gamma**2 / sigma**2

    def scalar(self, t: float) -> tuple[float, float]:
        """``(gamma_t, sigma_t)`` at one time, as float64 Python numbers."""
        gamma, sigma = self.gamma_sigma(torch.tensor(t, dtype=torch.float64))
        return float(gamma), float(sigma)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FlowSchedule(Schedule):
    """Rectified-flow path ``gamma_t = 1 - t``, ``sigma_t = t`` (paper Eq. 4)."""

    name = "flow"
    timestep_scale = 1000.0

    def gamma_sigma(self, t: Tensor) -> GammaSigma:
        return GammaSigma(1.0 - t, t)

    def log_snr(self, t: Tensor) -> Tensor:
        return torch.log1p(-t) - torch.log(t)

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        return torch.sigmoid(-lam)


BETA_SCHEDULES = ("scaled_linear", "linear")
"""``scaled_linear``: ``beta`` linear in its square root (Stable Diffusion 1.5); ``linear``: linear in
``beta`` itself (AnimateDiff's motion-module training)."""


def make_betas(beta_schedule: str, beta_start: float, beta_end: float, steps: int) -> Tensor:
    """The discrete ``beta_1 .. beta_N`` of a named schedule, float64 ``(N,)``."""
    if beta_schedule == "scaled_linear":
        return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), steps, dtype=torch.float64) ** 2
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
    raise ValueError(f"beta_schedule={beta_schedule!r} is unknown; expected one of {list(BETA_SCHEDULES)}")


class DDIMSchedule(Schedule):
    """A discrete DDPM/DDIM schedule on continuous t, log-SNR interpolated between steps.

    By default Stable Diffusion 1.5's: ``beta`` "scaled linear" from 0.00085 to 0.012 over 1000 steps;
    ``beta_schedule="linear"`` gives AnimateDiff's training schedule over the same range. ``t`` maps to
    step ``n = t * 999``. At integer steps the values equal the discrete table exactly.
    """

    name = "ddim"
    timestep_scale = 999.0

    def __init__(self, beta_start: float = 0.00085, beta_end: float = 0.012, num_train_steps: int = 1000,
                 beta_schedule: str = "scaled_linear"):
        steps = num_train_steps
        self.beta_schedule = beta_schedule
        betas = make_betas(beta_schedule, beta_start, beta_end, steps)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # (N,)
        self.gamma_table = self.alphas_cumprod.sqrt()
        self.sigma_table = (1.0 - self.alphas_cumprod).sqrt()
        self.lam_table = torch.log(self.gamma_table) - torch.log(self.sigma_table)  # decreasing
        self.last_step = steps - 1
        self.timestep_scale = float(self.last_step)
        self._tables_on: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}

    def tables(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """``(lam, gamma, sigma)`` tables on ``device``, copied there once (not on every call of a training step)."""
        if device not in self._tables_on:
            self._tables_on[device] = tuple(table.to(device) for table in
                                            (self.lam_table, self.gamma_table, self.sigma_table))
        return self._tables_on[device]

    def _step(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Integer step below ``n = t * last_step``, the fraction above it, and the step above."""
        n = t.to(torch.float64) * self.last_step
        # t = n / 999 does not round-trip exactly in floating point; snap those back onto the step.
        n = torch.where((n - n.round()).abs() < 1e-9, n.round(), n)
        lo = n.floor().clamp(0, self.last_step)
        frac = n - lo
        hi = (lo + 1).clamp(max=self.last_step)
        return lo.long(), frac, hi.long()

    def log_snr(self, t: Tensor) -> Tensor:
        table = self.tables(t.device)[0]
        lo, frac, hi = self._step(t)
        lam = table[lo] + frac * (table[hi] - table[lo])
        return lam.to(t.dtype) if t.is_floating_point() else lam

    def gamma_sigma(self, t: Tensor) -> GammaSigma:
        lo, frac, _ = self._step(t)
        lam = self.log_snr(t).to(torch.float64)
        gamma = torch.sigmoid(2 * lam).sqrt()
        sigma = torch.sigmoid(-2 * lam).sqrt()
        # Integer steps read the table itself so they match the discrete schedule bit for bit.
        on_step = frac == 0
        _, gamma_table, sigma_table = self.tables(t.device)
        gamma = torch.where(on_step, gamma_table[lo], gamma)
        sigma = torch.where(on_step, sigma_table[lo], sigma)
        dtype = t.dtype if t.is_floating_point() else torch.float64
        return GammaSigma(gamma.to(dtype), sigma.to(dtype))

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        table = self.tables(lam.device)[0]
        lam64 = lam.to(torch.float64)
        # The table decreases, so search in its negation; hi is the first step with lam_n <= lam.
        hi = torch.searchsorted(-table, -lam64).clamp(1, self.last_step)
        lo = hi - 1
        frac = (lam64 - table[lo]) / (table[hi] - table[lo])
        t = (lo.to(torch.float64) + frac.clamp(0, 1)) / self.last_step
        return t.to(lam.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(beta_schedule={self.beta_schedule!r})"


SCHEDULES = {"flow": FlowSchedule, "ddim": DDIMSchedule}


def make_schedule(schedule: str | Schedule, beta_schedule: str | None = None) -> Schedule:
    """Build a schedule from its name (``"flow"`` or ``"ddim"``), or pass one through.

    ``beta_schedule`` (``"scaled_linear"`` or ``"linear"``) applies to ``"ddim"`` only; ``None`` keeps
    the default (Stable Diffusion 1.5's ``"scaled_linear"``).
    """
    if isinstance(schedule, Schedule):
        if beta_schedule is not None:
            raise ValueError(f"beta_schedule={beta_schedule!r} cannot be applied to a built schedule {schedule!r}; "
                             "expected the schedule's name")
        return schedule
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is unknown; expected one of {sorted(SCHEDULES)}")
    if beta_schedule is None:
        return SCHEDULES[schedule]()
    if schedule != "ddim":
        raise ValueError(f"beta_schedule={beta_schedule!r} is set for schedule={schedule!r}; expected it only "
                         "with schedule='ddim' (flow has no beta schedule)")
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule={beta_schedule!r} is unknown; expected one of {list(BETA_SCHEDULES)}")
    return DDIMSchedule(beta_schedule=beta_schedule)
