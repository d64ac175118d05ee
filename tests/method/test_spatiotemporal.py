"""The spatio-temporal pyramid: spatial factors ``q_i`` beside the frame-rate factors ``r_i`` (docs/method.md)."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as nnf
from torch.testing import assert_close

from tpdiff_lightning.method.pyramid import TemporalPyramid, spatial_down, spatial_up
from tpdiff_lightning.method.sampling import sample, split_steps

F64 = torch.float64
REFERENCE = Path(__file__).parents[1] / "reference" / "temporal_pyramid_reference.pt"


def _data(B=2, C=3, F=16, H=8, W=8, seed=0):
    return torch.randn(B, C, F, H, W, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---- All q_i = 1 is today's temporal pyramid, to float64 rounding ------------------------------------------------

# The reference was written on one CPU; another CPU's kernels round float64 differently by up to ~1e-15 relative.
# 1e-12 relative accepts that and still fails on any real change of the arithmetic (a changed coefficient, step or
# draw moves these values by far more than 1e-9).
REFERENCE_TOLERANCE = dict(rtol=1e-12, atol=1e-12)


def assert_matches_reference(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert_close(got[key], expected[key], **REFERENCE_TOLERANCE, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("spatial", ["unset", "ones"])
@pytest.mark.parametrize("case", ["flow", "flow-global-4-2", "ddim-anchored", "flow-anchored-4-2"])
def test_unit_spatial_factors_reproduce_the_temporal_pyramid(case, spatial):
    from tests.reference.make_temporal_pyramid_reference import CASES, reference_outputs

    expected = torch.load(REFERENCE)[case]  # written by the code before spatial factors existed
    extra = {} if spatial == "unset" else {"spatial_reductions": [1, 1]}
    assert_matches_reference(reference_outputs(CASES[case], **extra), expected)


def test_the_reference_comparison_accepts_another_cpus_rounding_and_catches_a_real_change():
    expected = torch.load(REFERENCE)["flow"]
    rounding = {k: v * (1 + 1e-15) + 1e-16 for k, v in expected.items()}  # what another CPU's kernels give
    assert_matches_reference(rounding, expected)
    changed = dict(expected, sample=expected["sample"] * (1 + 1e-9))  # the smallest change the test must see
    with pytest.raises(AssertionError, match="sample"):
        assert_matches_reference(changed, expected)


# ---- Strides, shapes, Down and Up ------------------------------------------------------------------------------

def test_spatial_strides_and_stage_shapes():
    p = TemporalPyramid("flow", 16, 3, reductions=(2, 2), spatial_reductions=(2, 2))
    assert [(s.stride, s.spatial_stride, s.num_frames) for s in p.stages] == [(4, 4, 4), (2, 2, 8), (1, 1, 16)]
    assert [s.group_size for s in p.stages] == [8, 8, 1]
    x0 = _data(H=8, W=12)
    assert [p.stage_shape(x0, i) for i in range(3)] == [(2, 3, 4, 2, 3), (2, 3, 8, 4, 6), (2, 3, 16, 8, 12)]
    pure = TemporalPyramid("flow", 16, 3, reductions=(1, 1), spatial_reductions=(2, 4))  # a pure spatial pyramid
    assert [(s.stride, s.spatial_stride, s.num_frames) for s in pure.stages] == [(1, 8, 16), (1, 4, 16), (1, 1, 16)]


def test_a_size_that_does_not_divide_is_a_one_line_error_naming_it():
    p = TemporalPyramid("flow", 16, 3, spatial_reductions=(2, 2))
    x0 = _data(H=8, W=6)
    with pytest.raises(ValueError, match=r"^width=6 does not fit spatial stride 4: expected width % stride == 0"):
        p.endpoints(x0, torch.zeros(2, 3, 4, 2, 1, dtype=F64), 0)
    with pytest.raises(ValueError, match=r"^height=10 does not fit spatial stride 4"):
        p.stage_size(10, 8, 0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(spatial_reductions=(2,)), r"spatial_reductions=\[2\] has length 1; expected num_stages - 1 = 2"),
    (dict(spatial_reductions=(2, 0)), r"spatial_reductions=\[2, 0\] is invalid; expected integers >= 1"),
    (dict(spatial_reductions=(2, 1.5)), r"spatial_reductions=\[2, 1.5\] is invalid"),
    (dict(reductions=(1, 2), spatial_reductions=(1, 2)), r"reductions=\[1, 2\] is invalid; expected integers >= 2 "
                                                         r"\(1 only where spatial_reductions is above 1\)"),
])
def test_bad_spatial_configuration_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TemporalPyramid("flow", 16, 3, **kwargs)


def test_spatial_down_is_the_block_mean_and_up_is_nearest():
    x = _data(F=4, H=8, W=8)
    assert_close(spatial_down(x, 2), nnf.avg_pool3d(x, (1, 2, 2)), rtol=0, atol=1e-15)
    assert_close(spatial_down(x, 4), nnf.avg_pool3d(x, (1, 4, 4)), rtol=0, atol=1e-15)
    assert torch.equal(spatial_up(x, 2), nnf.interpolate(x, scale_factor=(1, 2, 2), mode="nearest"))
    assert spatial_down(x, 1) is x and spatial_up(x, 1) is x


@pytest.mark.parametrize("anchor", [False, True])
def test_down_down_composes_and_down_inverts_up(anchor):
    F = 17 if anchor else 16
    p = TemporalPyramid("flow", F, 3, anchor_first_frame=anchor, spatial_reductions=(2, 2))
    x = _data(F=F)
    assert_close(p.downsample(p.downsample(x, 2, 2), 2, 2), p.downsample(x, 4, 4), rtol=0, atol=1e-14)
    assert_close(p.downsample(p.downsample(x, 1, 2), 4, 2), p.downsample(x, 4, 4), rtol=0, atol=1e-14)
    small = p.downsample(x, 4, 4)
    for r, q in [(2, 2), (4, 2), (1, 2), (2, 1)]:
        up = p.upsample(small, r, q)
        frames = (small.shape[2] - 1) * r + 1 if anchor else small.shape[2] * r
        assert up.shape == (2, 3, frames, 2 * q, 2 * q)
        assert torch.equal(p.downsample(up, r, q), small)  # Down inverts the nearest Up exactly
    # anchored: frame 0 stays single in time and is copied q x q in space
    up = p.upsample(small[:, :, :2], 2, 2)
    expected = [0, 1, 1] if anchor else [0, 0, 1, 1]
    assert torch.equal(up, spatial_up(small[:, :, expected], 2))


def test_spatial_up_is_q2_times_the_adjoint_of_down():
    x, y = _data(F=3, H=4, W=4, seed=1), _data(F=3, H=8, W=8, seed=2)
    for q in (2, 4):
        xs = spatial_down(_data(F=3, H=4 * q, W=4 * q, seed=3), q)
        ys = _data(F=3, H=4 * q, W=4 * q, seed=4)
        assert_close((spatial_up(xs, q) * ys).sum(), q * q * (xs * spatial_down(ys, q)).sum(), rtol=1e-13, atol=0)
    assert_close((spatial_up(x, 2) * y).sum(), 4 * (x * spatial_down(y, 2)).sum(), rtol=1e-13, atol=0)


# ---- The jump, Pyramid Flow parity, end points, targets -------------------------------------------------------

@pytest.mark.parametrize("schedule", ["flow", "ddim"])
@pytest.mark.parametrize("r,q", [((2, 2), (2, 2)), ((1, 2), (2, 1)), ((4, 1), (1, 2)), ((1, 1), (2, 2))])
def test_window_ends_satisfy_the_snr_jump_of_the_group_size(schedule, r, q):
    p = TemporalPyramid(schedule, 16, 3, reductions=r, spatial_reductions=q)
    for i in range(2):
        snr_e = p.schedule.snr(torch.tensor(p.stages[i].t_end, dtype=F64))
        snr_s = p.schedule.snr(torch.tensor(p.stages[i + 1].t_start, dtype=F64))
        assert float(snr_e / snr_s) == pytest.approx(r[i] * q[i] ** 2, rel=1e-8)
        if schedule == "flow":
            s, G = p.stages[i + 1].t_start, r[i] * q[i] ** 2
            assert p.stages[i].t_end == pytest.approx(s / (s + math.sqrt(G) * (1 - s)), abs=1e-12)


@pytest.mark.parametrize("partition", [(1, 1), (1, 2), (3, 1), (1, 7)])
def test_a_pure_spatial_2x_step_in_flow_is_pyramid_flows_jump(partition):
    """Pyramid Flow (data at time 1, x = tau x0 + (1 - tau) noise) ends a stage at ``2 s / (1 + s)`` when the
    next one starts at ``s``. Their ``tau`` is our ``1 - t``."""
    p = TemporalPyramid("flow", 4, 2, reductions=(1,), spatial_reductions=(2,), partition=partition)
    tau_next_start = 1 - p.stages[1].t_start
    tau_end = 1 - p.stages[0].t_end
    assert tau_end == pytest.approx(2 * tau_next_start / (1 + tau_next_start), abs=1e-13)
    # the temporal-only 2x step is not that jump (it is 2 s / (1 + s) only for 4 copies)
    temporal = TemporalPyramid("flow", 4, 2, reductions=(2,), partition=partition)
    assert 1 - temporal.stages[0].t_end != pytest.approx(2 * tau_next_start / (1 + tau_next_start), abs=1e-6)


@pytest.mark.parametrize("schedule", ["flow", "ddim"])
@pytest.mark.parametrize("anchor", [False, True])
def test_endpoints_follow_eq7_eq8_over_the_spatial_groups(schedule, anchor):
    F = 17 if anchor else 16
    p = TemporalPyramid(schedule, F, 3, anchor_first_frame=anchor, reductions=(2, 2), spatial_reductions=(2, 2))
    x0 = _data(F=F)
    for i in range(3):
        noise = torch.randn(p.stage_shape(x0, i), generator=torch.Generator().manual_seed(i), dtype=F64)
        x_start, x_end = p.endpoints(x0, noise, i)
        st = p.stages[i]
        gs, ss = p.schedule.scalar(st.t_start)
        ge, se = p.schedule.scalar(st.t_end)
        # an independent Down (strided frames, avg_pool) and Up (index list, interpolate)
        down = nnf.avg_pool3d(x0[:, :, ::st.stride], (1, st.spatial_stride, st.spatial_stride))
        assert_close(x_end, ge * down + se * noise, rtol=0, atol=1e-14)
        if i == 0:
            content = down
        else:
            prev = p.stages[i - 1]
            small = nnf.avg_pool3d(x0[:, :, ::prev.stride], (1, prev.spatial_stride, prev.spatial_stride))
            frames = [0] + [1 + (k - 1) // 2 for k in range(1, st.num_frames)] if anchor else \
                [k // 2 for k in range(st.num_frames)]
            content = nnf.interpolate(small[:, :, frames], scale_factor=(1, 2, 2), mode="nearest")
        assert_close(x_start, gs * content + ss * noise, rtol=0, atol=1e-14)
        x1, _, _ = p.interpolate(x0, noise, i, torch.ones(2, dtype=F64))
        x0_, _, _ = p.interpolate(x0, noise, i, torch.zeros(2, dtype=F64))
        tol = 0 if schedule == "flow" else 1e-12
        assert_close(x1, x_start, rtol=0, atol=tol)  # end points exact
        assert_close(x0_, x_end, rtol=0, atol=tol)


def test_global_flow_target_at_stage_0_is_vanilla_flow_matching_on_the_small_clip():
    p = TemporalPyramid("flow", 16, 3, spatial_reductions=(2, 2), flow_velocity="global")
    x0 = _data()
    noise = torch.randn(p.stage_shape(x0, 0), generator=torch.Generator().manual_seed(1), dtype=F64)
    x_t, t, target = p.interpolate(x0, noise, 0, torch.tensor([0.1, 0.8], dtype=F64))
    down = nnf.avg_pool3d(x0[:, :, ::4], (1, 4, 4))
    assert_close(target, noise - down, rtol=1e-13, atol=1e-13)
    assert_close(x_t, (1 - t.reshape(-1, 1, 1, 1, 1)) * down + t.reshape(-1, 1, 1, 1, 1) * noise, rtol=1e-13, atol=1e-13)


def test_one_stage_is_vanilla_flow_with_no_spatial_factors():
    p = TemporalPyramid("flow", 16, 1, spatial_reductions=[])
    x0 = _data()
    noise = _data(seed=5)
    u = torch.tensor([0.1, 0.8], dtype=F64)
    x_t, t, v = p.interpolate(x0, noise, 0, u)
    assert torch.equal(t, u) and p.stages[0].spatial_stride == 1
    assert_close(x_t, (1 - u.reshape(-1, 1, 1, 1, 1)) * x0 + u.reshape(-1, 1, 1, 1, 1) * noise, rtol=0, atol=1e-15)
    assert_close(v, noise - x0, rtol=0, atol=1e-15)


# ---- Renoise: Monte Carlo against the next stage's training start point ---------------------------------------

def _cell_groups(p, i, H, W):
    """Group id of each cell ``(frame, row, col)`` of stage i+1: the source value it was copied from."""
    small = p.stage_shape(torch.empty(1, 1, p.num_frames, H, W), i)
    ids = torch.arange(math.prod(small[2:]), dtype=F64).reshape(1, 1, *small[2:])
    st = p.stages[i]
    return p.upsample(ids, st.reduction, st.spatial_reduction).reshape(-1).long()


def _renoise_samples(schedule, r, q, anchor, n_samples):
    F = 2 * r + 1 if anchor else 2 * r  # two source frames after the anchor
    p = TemporalPyramid(schedule, F, 2, reductions=(r,), spatial_reductions=(q,), anchor_first_frame=anchor)
    H = W = 2
    x0 = _data(B=1, C=1, F=F, H=H, W=W, seed=3)
    st, nxt = p.stages
    ge, se = p.schedule.scalar(st.t_end)
    g = torch.Generator().manual_seed(11)
    eps = torch.randn(n_samples, *p.stage_shape(x0, 0)[1:], generator=g, dtype=F64)
    x_end = ge * p.downsample(x0, st.stride, st.spatial_stride) + se * eps  # stage 0's end point
    x_next = p.renoise(x_end, 0, generator=g).reshape(n_samples, -1)  # (N, cells of stage 1)
    gs, ss = p.schedule.scalar(nxt.t_start)
    mean_expected = (gs * p.start_content(x0, 1)).reshape(-1)
    return p, x_next, mean_expected, ss**2, _cell_groups(p, 0, H, W)


def _three_standard_errors(x, mean_expected, var, groups):
    """Checks, each within 3 standard errors, of the mean and covariance of ``x (N, d)`` against
    ``(mean_expected, var I)``: the pooled and the squared standardised cell means, and the covariance pooled by kind of entry (diagonal,
    pairs inside one group of copies, pairs across groups), separately for groups of each size."""
    N, d = x.shape
    failures = []
    z = (x.mean(0) - mean_expected) / math.sqrt(var / N)  # (d,) independent standard normals under the target
    if abs(float(z.mean())) > 3 / math.sqrt(d):
        failures.append(f"mean: pooled z = {float(z.mean()):.3f} beyond 3 SE = {3 / math.sqrt(d):.3f}")
    chi2 = float((z**2).sum())  # chi-square with d degrees of freedom: mean d, standard deviation sqrt(2 d)
    if abs(chi2 - d) > 3 * math.sqrt(2 * d):
        failures.append(f"mean: sum z^2 = {chi2:.1f} vs {d} (3 SE = {3 * math.sqrt(2 * d):.1f})")
    centred = x - x.mean(0)
    cov = centred.T @ centred / (N - 1)
    same = groups[:, None] == groups[None, :]
    size = torch.bincount(groups)[groups]  # (d,) size of each cell's group
    off = ~torch.eye(d, dtype=torch.bool)
    kinds = {}
    for s in size.unique().tolist():
        in_kind = (size == s)
        kinds[f"diag (group of {s})"] = (torch.eye(d, dtype=torch.bool) & in_kind[:, None], var, math.sqrt(2))
        kinds[f"same group of {s}"] = (same & off & in_kind[:, None], 0.0, 1.0)
    kinds["across groups"] = (~same, 0.0, 1.0)
    for name, (mask, expected, scale) in kinds.items():
        m = int(mask.sum())
        if m == 0:
            continue
        stat = float(cov[mask].mean())
        se = scale * var / math.sqrt(N * m)  # entries of one kind are uncorrelated estimates under the target law
        if abs(stat - expected) > 3 * se:
            failures.append(f"{name}: {stat:.5f} vs {expected:.5f} (3 SE = {3 * se:.5f})")
    return failures


GROUP_SHAPES = [(r, q, anchor) for r in (1, 2, 4) for q in (1, 2) for anchor in (False, True) if r * q > 1]


@pytest.mark.parametrize("schedule", ["flow", "ddim"])
@pytest.mark.parametrize("r,q,anchor", GROUP_SHAPES, ids=lambda v: str(v))
def test_renoise_matches_the_next_stage_start_within_three_standard_errors(schedule, r, q, anchor):
    p, x, mean_expected, var, groups = _renoise_samples(schedule, r, q, anchor, 40_000)
    assert _three_standard_errors(x, mean_expected, var, groups) == []


@pytest.mark.parametrize("r,q,anchor", [(2, 2, True), (1, 2, True), (4, 2, False)])
def test_the_monte_carlo_check_catches_a_renoise_that_ignores_space(r, q, anchor, monkeypatch):
    """Renoising as if only the frames were copied leaves the spatial copies correlated: the check must see it."""
    original = TemporalPyramid.renoise_noise

    def temporal_only(self, shape, reduction, generator=None, device=None, dtype=torch.float32, spatial_reduction=1):
        if reduction == 1:  # a pure spatial step has no temporal groups; fall back to independent noise
            return torch.randn(tuple(shape), generator=generator, dtype=dtype)
        return original(self, shape, reduction, generator, device, dtype)

    monkeypatch.setattr(TemporalPyramid, "renoise_noise", temporal_only)
    _, x, mean_expected, var, groups = _renoise_samples("flow", r, q, anchor, 40_000)
    assert _three_standard_errors(x, mean_expected, var, groups) != []


def test_anchored_first_frame_uses_the_partial_group_coefficient():
    """The anchored first frame is a group of q^2 out of G = r q^2: ``n = z - a mean(z)`` with
    ``a = 1 - sqrt(1 - 1/r)``, so its in-group covariance is ``I - J/G``, not ``I - J/q^2``."""
    p = TemporalPyramid("flow", 5, 2, reductions=(4,), spatial_reductions=(2,), anchor_first_frame=True)
    n = p.renoise_noise((200_000, 1, 5, 2, 2), 4, torch.Generator().manual_seed(0), dtype=F64, spatial_reduction=2)
    first = n[:, 0, 0].reshape(-1, 4)  # the 2 x 2 copies of the anchored frame
    cov = first.T @ first / first.shape[0]
    expected = torch.eye(4, dtype=F64) - torch.ones(4, 4, dtype=F64) / 16
    assert_close(cov, expected, atol=0.01, rtol=0)
    rest = n[:, 0, 1:].permute(1, 2, 3, 0).reshape(16, -1)  # one full group: 4 frames x 2 x 2
    assert_close(rest.sum(0), torch.zeros_like(rest[0]), atol=1e-12, rtol=0)  # a full group sums to zero


# ---- The sampler -------------------------------------------------------------------------------------------

def _flow_oracle(p, x0):
    """The exact stage-wise velocity for a single-clip data set, inverted from x_t."""
    def model(x, t, stage):
        assert x.shape[2:] == p.stage_shape(x0, stage.index)[2:]  # the model gets the small clip
        u = (t - stage.t_end) / (stage.t_start - stage.t_end)
        gs, ss = p.schedule.scalar(stage.t_start)
        ge, se = p.schedule.scalar(stage.t_end)
        c_s = p.start_content(x0, stage.index)
        c_e = p.downsample(x0, stage.stride, stage.spatial_stride)
        ub = u.reshape(-1, 1, 1, 1, 1).to(x.dtype)
        eps = (x - (1 - ub) * ge * c_e - ub * gs * c_s) / ((1 - ub) * se + ub * ss)
        return gs * c_s - ge * c_e + (ss - se) * eps
    return model


@pytest.mark.parametrize("cfg", [dict(reductions=(2, 2), spatial_reductions=(2, 2)),
                                 dict(reductions=(1, 2), spatial_reductions=(2, 1)),
                                 dict(reductions=(2, 2), spatial_reductions=(1, 2), anchor_first_frame=True)], ids=str)
def test_oracle_sampler_through_a_spatiotemporal_pyramid_lands_on_the_data(cfg):
    F = 17 if cfg.get("anchor_first_frame") else 16
    x0 = _data(B=1, C=2, F=F, H=8, W=4, seed=2)
    p = TemporalPyramid("flow", F, 3, **cfg)
    calls = []
    oracle = _flow_oracle(p, x0)
    model = lambda x, t, stage: (calls.append(stage.index), oracle(x, t, stage))[1]
    out = sample(model, p, 1, (2, 8, 4), 12, torch.Generator().manual_seed(0), dtype=F64)
    assert out.shape == x0.shape
    assert_close(out, x0, atol=1e-9, rtol=0)
    assert [calls.count(i) for i in range(3)] == split_steps(12, p.partition)


def test_sampler_refuses_a_frame_size_the_spatial_stride_does_not_divide():
    p = TemporalPyramid("flow", 16, 3, spatial_reductions=(2, 1))
    with pytest.raises(ValueError, match=r"width=5 does not fit spatial stride 2"):
        sample(lambda x, t, s: x, p, 1, (1, 4, 5), 6)
