"""The temporal (optionally spatio-temporal) pyramid: stages, windows with the jump, Down/Up, targets, renoise.

Stages are numbered in denoising order (stage 0 is the noisiest and has the lowest frame
rate); see ``docs/method.md``. Legend: ``S_i`` stride of stage i, ``F_i`` its frame count,
``r_i`` the frame-rate factor from stage i to i+1, ``q_i`` its spatial factor per side, ``P_i`` the
spatial stride of stage i (``H/P_i x W/P_i`` latents), ``G_i = r_i q_i^2`` the number of cells one
``Up`` copies a value into, ``s_i``/``e_i`` its start/end time,
``x_start``/``x_end`` the stage's end points (paper Eq. 7/8), ``u`` the position inside a
stage (1 at the start), ``eps_k`` the stage's DDIM noise (Eq. 11).

Flow velocity: ``"stage"`` is the derivative of ``x_t`` in ``u`` (paper Eq. 13), ``x_start - x_end``;
``"global"`` is the derivative in global time ``t``, ``(x_start - x_end) / (s_i - e_i)``, which is the
ordinary flow target ``eps - x_bar`` of the stage's virtual pair and what a pretrained flow model predicts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from tpdiff_lightning.method.schedules import Schedule, make_schedule
from tpdiff_lightning.method.values import is_integer, is_number

FLOW_VELOCITIES = ("stage", "global")


@dataclass(frozen=True)
class Stage:
    """One stage of the pyramid, in denoising order."""

    index: int
    num_frames: int
    stride: int
    t_start: float
    t_end: float
    reduction: int
    """Frame-rate factor to the next stage; 1 for the last stage."""
    spatial_stride: int = 1
    """``P_i``: stage i holds ``H / P_i x W / P_i`` latents."""
    spatial_reduction: int = 1
    """Spatial factor per side to the next stage; 1 for the last stage."""

    @property
    def group_size(self) -> int:
        """``G_i = r_i q_i^2``: the cells one value of this stage is copied into by ``Up``."""
        return self.reduction * self.spatial_reduction**2


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    """Shape a per-sample ``(B,)`` tensor to broadcast against ``(B, C, F, H, W)``."""
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


Generators = torch.Generator | Sequence[torch.Generator] | None
"""One generator for the whole batch, or one per sample (row b drawn from ``generators[b]``)."""


def randn(shape: Sequence[int], generator: Generators = None, device=None,
          dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise drawn on the generator's device, then moved, so a CPU seed works for any device.

    With a sequence of generators, one per sample, row b is what ``generator[b]`` alone draws for a batch
    of one: a batch of seeded samples equals those samples drawn one at a time.
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        generators = list(generator)
        if len(generators) != shape[0]:
            raise ValueError(f"{len(generators)} generators for a batch of {shape[0]}; expected one per sample")
        return torch.cat([randn((1, *shape[1:]), g, device, dtype) for g in generators])
    draw_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=dtype).to(device)


def time_dtype(x: Tensor) -> torch.dtype:
    """Times stay in at least float32 even for half-precision data, so the backbone is told the exact t."""
    return torch.promote_types(x.dtype, torch.float32)


def frames_at_stride(num_frames: int, stride: int, anchor_first_frame: bool) -> int:
    """``F / S``, or ``(F - 1) / S + 1`` with an anchored first frame; an error if it does not divide."""
    span = num_frames - 1 if anchor_first_frame else num_frames
    if span < 0 or span % stride != 0 or (not anchor_first_frame and span == 0):
        rule = "(num_frames - 1) % stride == 0 (anchor_first_frame)" if anchor_first_frame else "num_frames % stride == 0"
        raise ValueError(f"num_frames={num_frames} does not fit stride {stride}: expected {rule}")
    return span // stride + (1 if anchor_first_frame else 0)


def size_at_stride(name: str, size: int, stride: int) -> int:
    """``size / P`` for a spatial size; an error naming the size if it does not divide."""
    if size % stride != 0:
        raise ValueError(f"{name}={size} does not fit spatial stride {stride}: expected {name} % stride == 0 "
                         "(set by spatial_reductions)")
    return size // stride


def spatial_down(x: Tensor, stride: int) -> Tensor:
    """Mean over ``P x P`` blocks of the last two dimensions of ``(B, C, F, H, W)``."""
    if stride == 1:
        return x
    B, C, F, H, W = x.shape
    h, w = size_at_stride("height", H, stride), size_at_stride("width", W, stride)
    return x.reshape(B, C, F, h, stride, w, stride).mean(dim=(4, 6))  # (B, C, F, H / P, W / P)


def spatial_up(x: Tensor, factor: int) -> Tensor:
    """Nearest spatial upsampling: each value copied into a ``q x q`` block."""
    if factor == 1:
        return x
    return x.repeat_interleave(factor, dim=3).repeat_interleave(factor, dim=4)  # (B, C, F, H q, W q)


class TemporalPyramid:
    """TPDiff's temporal pyramid over one noise schedule, optionally shrinking in space as well.

    Args:
        schedule: ``"flow"`` (flow matching) or ``"ddim"`` (Stable Diffusion 1.5 schedule).
        num_frames: frames of the full-rate clip (latent frames when a VAE is used).
        num_stages: K; 1 is vanilla diffusion.
        reductions: ``K - 1`` frame-rate factors between consecutive stages (default all 2).
        partition: ``K`` weights splitting [0, 1] into stage windows (default uniform).
        anchor_first_frame: keep frame 0 out of the stride, for causal VAEs with ``1 + 4k`` frames.
        stage_weights: ``K`` training probabilities of each stage (default proportional to ``partition``).
        flow_velocity: ``"stage"`` (default) trains and samples the flow velocity in the stage's own time
            ``u``; ``"global"`` the velocity in global time ``t`` (pretrained flow models). Flow only.
        spatial_reductions: ``K - 1`` spatial factors per side between consecutive stages (default all 1,
            the temporal pyramid). A transition with ``q_i > 1`` may keep the frame rate (``r_i = 1``).
    """

    def __init__(
        self,
        schedule: str | Schedule = "flow",
        num_frames: int = 16,
        num_stages: int = 3,
        reductions: Sequence[int] | None = None,
        partition: Sequence[float] | None = None,
        anchor_first_frame: bool = False,
        stage_weights: Sequence[float] | None = None,
        flow_velocity: str = "stage",
        spatial_reductions: Sequence[int] | None = None,
    ):
        if not is_integer(num_stages) or num_stages < 1:
            raise ValueError(f"num_stages={num_stages!r} is invalid; expected an integer >= 1")
        K = num_stages
        reductions = tuple(reductions) if reductions is not None else (2,) * (K - 1)
        partition = tuple(partition) if partition is not None else (1.0,) * K
        if len(reductions) != K - 1:
            raise ValueError(f"reductions={list(reductions)} has length {len(reductions)}; expected num_stages - 1 = {K - 1}")
        spatial_reductions = tuple(spatial_reductions) if spatial_reductions is not None else (1,) * (K - 1)
        if len(spatial_reductions) != K - 1:
            raise ValueError(f"spatial_reductions={list(spatial_reductions)} has length {len(spatial_reductions)}; "
                             f"expected num_stages - 1 = {K - 1}")
        if any(not is_integer(q) or q < 1 for q in spatial_reductions):
            raise ValueError(f"spatial_reductions={list(spatial_reductions)} is invalid; expected integers >= 1")
        if any(not is_integer(r) or r < 1 or (r == 1 and q == 1) for r, q in zip(reductions, spatial_reductions)):
            raise ValueError(f"reductions={list(reductions)} is invalid; expected integers >= 2 "
                             "(1 only where spatial_reductions is above 1)")
        if len(partition) != K:
            raise ValueError(f"partition={list(partition)} has length {len(partition)}; expected num_stages = {K}")
        if any(not (is_number(w) and w > 0) for w in partition):
            raise ValueError(f"partition={list(partition)} is invalid; expected positive weights")
        stage_weights = tuple(stage_weights) if stage_weights is not None else partition
        if len(stage_weights) != K or any(not (is_number(w) and w >= 0) for w in stage_weights) or sum(stage_weights) <= 0:
            raise ValueError(f"stage_weights={list(stage_weights)} is invalid; expected {K} non-negative weights with a "
                             "positive sum, one per stage (or null: in proportion to the partition)")

        self.schedule = make_schedule(schedule)
        if flow_velocity not in FLOW_VELOCITIES:
            raise ValueError(f"flow_velocity={flow_velocity!r} is invalid; expected one of {list(FLOW_VELOCITIES)}")
        if flow_velocity == "global" and self.schedule.name != "flow":
            raise ValueError(f"flow_velocity='global' is set for schedule={self.schedule.name!r}; expected it only "
                             "with schedule='flow' (DDIM predicts the noise)")
        self.flow_velocity = flow_velocity
        self.num_frames = num_frames
        self.num_stages = K
        self.reductions = reductions
        self.partition = partition
        self.anchor_first_frame = anchor_first_frame
        self.stage_weights = stage_weights
        self.spatial_reductions = spatial_reductions
        self._boundary_coefficients: dict[float, tuple[float, float]] = {}
        self.stages = self._build_stages()

    def _build_stages(self) -> list[Stage]:
        K, r, q = self.num_stages, self.reductions, self.spatial_reductions
        strides = [math.prod(r[i:]) for i in range(K)]  # S_i = r_i * ... * r_{K-2}
        spatial_strides = [math.prod(q[i:]) for i in range(K)]  # P_i = q_i * ... * q_{K-2}
        total = float(sum(self.partition))
        starts = [1.0 - sum(self.partition[:i]) / total for i in range(K)]
        ends = [self.window_end(starts[i + 1], r[i], q[i]) for i in range(K - 1)] + [0.0]
        return [
            Stage(i, frames_at_stride(self.num_frames, strides[i], self.anchor_first_frame), strides[i],
                  starts[i], ends[i], r[i] if i < K - 1 else 1, spatial_strides[i], q[i] if i < K - 1 else 1)
            for i in range(K)
        ]

    @property
    def spatial(self) -> bool:
        """Whether any stage holds fewer latents per frame than the full-resolution clip."""
        return self.stages[0].spatial_stride > 1

    def window_end(self, next_start: float, reduction: int, spatial_reduction: int = 1) -> float:
        """``e_i`` with ``SNR(e_i) = r_i q_i^2 SNR(s_{i+1})`` (paper Eq. 15/21 for ``q_i = 1``): the jump before ``Up``."""
        lam_next = self.schedule.log_snr(torch.tensor(next_start, dtype=torch.float64))
        group = reduction * spatial_reduction**2  # G_i: each value is copied into G_i cells
        lam_end = lam_next + 0.5 * math.log(group)
        t_end = float(self.schedule.t_from_log_snr(lam_end))
        reached = float(self.schedule.log_snr(torch.tensor(t_end, dtype=torch.float64)))
        if not math.isclose(reached, float(lam_end), rel_tol=1e-9, abs_tol=1e-9):
            raise ValueError(
                f"a stage starting at t={next_start:.6f} with reduction {reduction} and spatial reduction "
                f"{spatial_reduction} needs the previous stage to end "
                f"at log-SNR {float(lam_end):.4f}, beyond what the {self.schedule.name} schedule reaches "
                f"({reached:.4f}); expected a larger share of the partition for the later stages")
        return t_end

    def with_num_frames(self, num_frames: int) -> "TemporalPyramid":
        """The same pyramid for another clip length (zero-shot long video)."""
        return TemporalPyramid(self.schedule, num_frames, self.num_stages, self.reductions, self.partition,
                               self.anchor_first_frame, self.stage_weights, self.flow_velocity,
                               self.spatial_reductions)

    def stage_size(self, height: int, width: int, i: int) -> tuple[int, int]:
        """Stage i's latent ``(H / P_i, W / P_i)``; an error naming the size that does not divide."""
        P = self.stages[i].spatial_stride
        return size_at_stride("height", height, P), size_at_stride("width", width, P)

    def stage_shape(self, x0: Tensor, i: int) -> tuple[int, ...]:
        """Shape of stage i's tensors for a full-rate ``x0`` of shape ``(B, C, F, H, W)``."""
        B, C, _, H, W = x0.shape
        return (B, C, self.stages[i].num_frames, *self.stage_size(H, W, i))

    def downsample(self, x: Tensor, stride: int, spatial_stride: int = 1) -> Tensor:
        """``Down(x, S, P)``: keep frames ``0, S, 2S, ...`` of ``(B, C, F, H, W)``, then average ``P x P`` blocks."""
        frames_at_stride(x.shape[2], stride, self.anchor_first_frame)
        return spatial_down(x[:, :, ::stride], spatial_stride)  # (B, C, F / S, H / P, W / P)

    def upsample(self, x: Tensor, factor: int, spatial_factor: int = 1) -> Tensor:
        """``Up(x, r, q)``: repeat each frame r times and each latent into a ``q x q`` block (nearest);
        anchored, frame 0 stays single in time."""
        if not self.anchor_first_frame:
            return spatial_up(x.repeat_interleave(factor, dim=2), spatial_factor)  # (B, C, F r, H q, W q)
        rest = x[:, :, 1:].repeat_interleave(factor, dim=2)  # (B, C, (F - 1) * r, H, W)
        return spatial_up(torch.cat([x[:, :, :1], rest], dim=2), spatial_factor)  # (B, C, 1 + (F - 1) r, H q, W q)

    def _coefficients(self, t: float) -> tuple[float, float]:
        """``(gamma_t, sigma_t)`` at a stage boundary as Python numbers: scaling a tensor by them copies nothing to
        the device (a ``torch.tensor(..., device=...)`` per call would, several times a step)."""
        if t not in self._boundary_coefficients:
            self._boundary_coefficients[t] = self.schedule.scalar(t)
        return self._boundary_coefficients[t]

    def start_content(self, x0: Tensor, i: int) -> Tensor:
        """The clean content of stage i's start: ``Up(Down(x0, S_{i-1}, P_{i-1}), r_{i-1}, q_{i-1})``, or
        ``Down(x0, S_0, P_0)``."""
        if i == 0:
            return self.downsample(x0, self.stages[0].stride, self.stages[0].spatial_stride)
        prev = self.stages[i - 1]
        return self.upsample(self.downsample(x0, prev.stride, prev.spatial_stride), prev.reduction,
                             prev.spatial_reduction)

    def endpoints(self, x0: Tensor, noise: Tensor, i: int) -> tuple[Tensor, Tensor]:
        """Stage i's start and end points (paper Eq. 7 and 8), sharing one noise draw.

        Args:
            x0: full-rate data ``(B, C, F, H, W)``.
            noise: noise at stage i's shape ``(B, C, F_i, H / P_i, W / P_i)``.
        Returns:
            ``(x_start, x_end)``, both at stage i's shape.
        """
        self._check_stage(i)
        if x0.ndim != 5 or x0.shape[2] != self.num_frames:
            raise ValueError(f"x0 has shape {tuple(x0.shape)}; expected (B, C, {self.num_frames}, H, W), "
                             f"the pyramid's full-rate num_frames={self.num_frames}")
        expected = self.stage_shape(x0, i)
        if tuple(noise.shape) != expected:
            raise ValueError(f"noise has shape {tuple(noise.shape)}; expected stage {i}'s shape {expected}")
        stage = self.stages[i]
        gamma_s, sigma_s = self._coefficients(stage.t_start)
        gamma_e, sigma_e = self._coefficients(stage.t_end)
        x_start = gamma_s * self.start_content(x0, i) + sigma_s * noise
        x_end = gamma_e * self.downsample(x0, stage.stride, stage.spatial_stride) + sigma_e * noise
        return x_start, x_end

    def stage_time(self, i: int, u: Tensor) -> Tensor:
        """Global time ``t = e_i + u * (s_i - e_i)`` of position ``u`` inside stage i."""
        stage = self.stages[i]
        return stage.t_end + u * (stage.t_start - stage.t_end)

    def interpolate(self, x0: Tensor, noise: Tensor, i: int, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Stage-wise ``x_t`` and regression target at positions ``u`` (B,) inside stage i.

        ``flow`` (Eq. 12/13): ``x_t = (1 - u) x_end + u x_start``, target ``x_start - x_end`` (velocity in u),
        or ``(x_start - x_end) / (s_i - e_i)`` with ``flow_velocity="global"`` (velocity in t).
        ``ddim`` (Eq. 10/11): ``x_t`` on the DDIM path through ``x_start`` with noise ``eps_k``, target ``eps_k``.
        Returns ``(x_t, t, target)`` with ``t`` the global time (B,).
        """
        x_start, x_end = self.endpoints(x0, noise, i)
        u = u.to(device=x0.device, dtype=time_dtype(x0))
        t = self.stage_time(i, u)  # (B,), float32 or wider
        if self.schedule.name == "flow":
            ub = _bcast(u, x0)
            return (1 - ub) * x_end + ub * x_start, t, (x_start - x_end) / self.velocity_span(i)
        eps_k = self.stage_noise(x_start, x_end, i)
        gamma_t, sigma_t = (_bcast(c, x0) for c in self.schedule.gamma_sigma(t))
        gamma_s, sigma_s = self._coefficients(self.stages[i].t_start)
        x_t = (gamma_t / gamma_s) * x_start + gamma_t * eps_k * (sigma_t / gamma_t - sigma_s / gamma_s)
        return x_t, t, eps_k

    def velocity_span(self, i: int) -> float:
        """``dt/du`` that the flow target is divided by: ``s_i - e_i`` for the global-time velocity, else 1."""
        stage = self.stages[i]
        return stage.t_start - stage.t_end if self.flow_velocity == "global" else 1.0

    def stage_noise(self, x_start: Tensor, x_end: Tensor, i: int) -> Tensor:
        """``eps_k = (x_end / gamma_e - x_start / gamma_s) / (sigma_e / gamma_e - sigma_s / gamma_s)`` (Eq. 11)."""
        stage = self.stages[i]
        gamma_s, sigma_s = self._coefficients(stage.t_start)
        gamma_e, sigma_e = self._coefficients(stage.t_end)
        return (x_end / gamma_e - x_start / gamma_s) / (sigma_e / gamma_e - sigma_s / gamma_s)

    def renoise_noise(self, shape: Sequence[int], reduction: int, generator: Generators = None,
                      device=None, dtype=torch.float32, spatial_reduction: int = 1) -> Tensor:
        """``n = z - a_g * mean_g(z)`` over each group g of copies, ``a_g = 1 - sqrt(1 - |g| / G)``, ``G = r q^2``.

        A group is the ``r`` frames times ``q x q`` latents one value was copied into (``q x q`` for the
        anchored first frame). Its covariance is ``I - J / G`` inside a full group, so added to the shared
        noise of the copies it restores ``sigma^2 I`` (Eq. 15 generalised from 2 to G copies).
        """
        z = randn(shape, generator, device, dtype)  # (B, C, F', H', W')
        B, C, F, H, W = z.shape
        r, q = reduction, spatial_reduction
        if q != 1:
            return self._centre_spatiotemporal_groups(z, r, q)
        if self.anchor_first_frame:
            first = z[:, :, :1] * math.sqrt(1.0 - 1.0 / r)  # a group of one: z - a z
            rest = z[:, :, 1:].reshape(B, C, (F - 1) // r, r, H, W)  # (B, C, groups, r, H, W)
            rest = (rest - rest.mean(dim=3, keepdim=True)).reshape(B, C, F - 1, H, W)
            return torch.cat([first, rest], dim=2)
        groups = z.reshape(B, C, F // r, r, H, W)  # (B, C, groups, r, H, W)
        return (groups - groups.mean(dim=3, keepdim=True)).reshape(B, C, F, H, W)

    def _centre_spatiotemporal_groups(self, z: Tensor, r: int, q: int) -> Tensor:
        """``z - a_g mean_g(z)`` over groups of ``r`` frames x ``q x q`` latents (first frame: ``q x q`` when anchored)."""
        B, C, F, H, W = z.shape
        h, w = H // q, W // q

        def centre(frames: Tensor, group_frames: int, a: float) -> Tensor:
            n = frames.shape[2]
            g = frames.reshape(B, C, n // group_frames, group_frames, h, q, w, q)  # (B, C, groups, r, h, q, w, q)
            g = g - a * g.mean(dim=(3, 5, 7), keepdim=True)
            return g.reshape(B, C, n, H, W)

        if not self.anchor_first_frame:
            return centre(z, r, 1.0)  # full groups: a_g = 1
        a_first = 1.0 - math.sqrt(1.0 - 1.0 / r)  # |g| = q^2 of G = r q^2
        return torch.cat([centre(z[:, :, :1], 1, a_first), centre(z[:, :, 1:], r, 1.0)], dim=2)

    def renoise(self, x_end: Tensor, i: int, generator: Generators = None, enabled: bool = True) -> Tensor:
        """Start of stage i+1 from the end of stage i: ``(gamma_s'/gamma_e) Up(x_end, r_i) + sigma_s' n``.

        With ``enabled=False`` (the paper's ablation) only the upsampling and the scale are applied.
        """
        self._check_stage(i)
        if i >= self.num_stages - 1:
            raise ValueError(f"stage {i} is the last stage; renoise needs a stage below {self.num_stages - 1}")
        stage, nxt = self.stages[i], self.stages[i + 1]
        gamma_e, _ = self._coefficients(stage.t_end)
        gamma_s, sigma_s = self._coefficients(nxt.t_start)
        x = (gamma_s / gamma_e) * self.upsample(x_end, stage.reduction, stage.spatial_reduction)  # stage i+1's shape
        if not enabled:
            return x
        n = self.renoise_noise(x.shape, stage.reduction, generator, device=x.device, dtype=x.dtype,
                               spatial_reduction=stage.spatial_reduction)
        return x + sigma_s * n

    def sample_stage(self, generator: torch.Generator | None = None) -> int:
        """Draw one stage for a whole batch, with probability proportional to ``stage_weights``."""
        weights = torch.tensor(self.stage_weights, dtype=torch.float64)
        return int(torch.multinomial(weights, 1, generator=generator))

    def _check_stage(self, i: int) -> None:
        if not 0 <= i < self.num_stages:
            raise IndexError(f"stage index {i} is out of range; expected 0 <= i < {self.num_stages}")

    def __repr__(self) -> str:
        rows = ", ".join(f"({s.num_frames}f x{s.stride}{f' /{s.spatial_stride}px' if s.spatial_stride > 1 else ''}, "
                         f"t {s.t_start:.3f}->{s.t_end:.3f})" for s in self.stages)
        velocity = f", {self.flow_velocity}-time velocity" if self.schedule.name == "flow" else ""
        return f"TemporalPyramid({self.schedule.name}{velocity}, {rows})"
