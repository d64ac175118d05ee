import math

import pytest
import torch
from torch.testing import assert_close

from tpdiff_lightning.method.pyramid import TemporalPyramid
from tpdiff_lightning.method.schedules import make_schedule

F64 = torch.float64
SCHEDULES = ["flow", "ddim", "ddim-linear"]
"""Every schedule the pyramid runs on; ``ddim-linear`` is DDIM with AnimateDiff's linear beta schedule."""


def _schedule(name):
    return make_schedule("ddim", beta_schedule="linear") if name == "ddim-linear" else name


def _data(B=2, C=3, F=16, H=4, W=4, seed=0):
    return torch.randn(B, C, F, H, W, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _stage_noise(p, x0, i, seed=1):
    return torch.randn(p.stage_shape(x0, i), generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_flow_windows_match_spec_numbers():
    p = TemporalPyramid("flow", 16, 3)
    assert [s.t_start for s in p.stages] == pytest.approx([1, 2 / 3, 1 / 3], abs=1e-12)
    assert [s.t_end for s in p.stages] == pytest.approx([0.5858, 0.2612, 0.0], abs=5e-5)
    assert [s.num_frames for s in p.stages] == [4, 8, 16]
    assert [s.stride for s in p.stages] == [4, 2, 1]


@pytest.mark.parametrize("reductions,partition", [((2, 2), (1, 1, 1)), ((4, 2), (2, 1, 1)), ((2, 4), (1, 1, 2)), ((4, 4), (1, 1, 1))])
def test_flow_window_end_closed_form(reductions, partition):
    p = TemporalPyramid("flow", 32, 3, reductions, partition)
    for i in range(2):
        s, r = p.stages[i + 1].t_start, reductions[i]
        assert p.stages[i].t_end == pytest.approx(s / (s + math.sqrt(r) * (1 - s)), abs=1e-12)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("reductions", [(2, 2), (4, 2), (2, 4), (4, 4)])
def test_window_ends_satisfy_the_snr_jump(schedule, reductions):
    p = TemporalPyramid(_schedule(schedule), 16, 3, reductions)
    for i in range(2):
        snr_e = p.schedule.snr(torch.tensor(p.stages[i].t_end, dtype=F64))
        snr_s = p.schedule.snr(torch.tensor(p.stages[i + 1].t_start, dtype=F64))
        assert float(snr_e / snr_s) == pytest.approx(reductions[i], rel=1e-8)
        assert p.stages[i].t_end < p.stages[i + 1].t_start


def test_partition_sets_stage_starts():
    p = TemporalPyramid("flow", 16, 3, partition=(1, 1, 2))
    assert [s.t_start for s in p.stages] == pytest.approx([1, 0.75, 0.5])
    p = TemporalPyramid("flow", 16, 3, partition=(2, 1, 1))
    assert [s.t_start for s in p.stages] == pytest.approx([1, 0.5, 0.25])


def test_strides_and_frames_for_uneven_reductions_and_anchoring():
    p = TemporalPyramid("flow", 16, 3, reductions=(4, 2))
    assert [(s.stride, s.num_frames) for s in p.stages] == [(8, 2), (2, 8), (1, 16)]
    p = TemporalPyramid("flow", 21, 3, anchor_first_frame=True)
    assert [(s.stride, s.num_frames) for s in p.stages] == [(4, 6), (2, 11), (1, 21)]
    p = TemporalPyramid("flow", 16, 5)
    assert [s.num_frames for s in p.stages] == [1, 2, 4, 8, 16]


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_frames=18, num_stages=3), r"num_frames=18.*stride 4.*num_frames % stride == 0"),
    (dict(num_frames=20, num_stages=3, anchor_first_frame=True), r"num_frames=20.*stride 4.*anchor_first_frame"),
    (dict(num_frames=16, num_stages=3, reductions=(2,)), r"reductions=\[2\].*expected num_stages - 1 = 2"),
    (dict(num_frames=16, num_stages=3, partition=(1, 1)), r"partition=\[1, 1\].*expected num_stages = 3"),
    (dict(num_frames=16, num_stages=3, partition=(1, 0, 1)), r"partition=\[1, 0, 1\].*positive"),
    (dict(num_frames=16, num_stages=0), r"num_stages=0"),
    (dict(num_frames=16, num_stages=2, reductions=(1,)), r"reductions=\[1\].*>= 2"),
    (dict(schedule="edm"), r"schedule='edm'"),
])
def test_bad_configuration_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TemporalPyramid(**kwargs)


@pytest.mark.parametrize("anchor", [False, True])
def test_down_up_conventions(anchor):
    F = 17 if anchor else 16
    p = TemporalPyramid("flow", F, 3, anchor_first_frame=anchor)
    x = _data(F=F)
    assert torch.equal(p.downsample(p.downsample(x, 2), 2), p.downsample(x, 4))
    assert torch.equal(p.downsample(x, 2), x[:, :, ::2])
    for r in (2, 4):
        small = p.downsample(x, 4)
        up = p.upsample(small, r)
        assert up.shape[2] == ((small.shape[2] - 1) * r + 1 if anchor else small.shape[2] * r)
        assert torch.equal(p.downsample(up, r), small)  # Down inverts the nearest Up
    up = p.upsample(x[:, :, :3], 2)
    expected = [0, 1, 1, 2, 2] if anchor else [0, 0, 1, 1, 2, 2]
    assert torch.equal(up, x[:, :, expected])


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("anchor", [False, True])
def test_interpolate_hits_end_points(schedule, anchor):
    F = 17 if anchor else 16
    p = TemporalPyramid(_schedule(schedule), F, 3, anchor_first_frame=anchor)
    x0 = _data(F=F)
    for i in range(3):
        noise = _stage_noise(p, x0, i)
        x_start, x_end = p.endpoints(x0, noise, i)
        x1, t1, _ = p.interpolate(x0, noise, i, torch.ones(2, dtype=F64))
        x0_, t0, _ = p.interpolate(x0, noise, i, torch.zeros(2, dtype=F64))
        if schedule == "flow":
            assert torch.equal(x1, x_start) and torch.equal(x0_, x_end)
        else:
            assert_close(x1, x_start, rtol=0, atol=1e-12)
            assert_close(x0_, x_end, rtol=0, atol=1e-12)
        assert t1.tolist() == pytest.approx([p.stages[i].t_start] * 2)
        assert t0.tolist() == pytest.approx([p.stages[i].t_end] * 2)


@pytest.mark.parametrize("schedule", ["flow", "ddim"])
def test_endpoints_follow_eq7_eq8(schedule):
    p = TemporalPyramid(schedule, 16, 3)
    x0 = _data()
    i = 1
    noise = _stage_noise(p, x0, i)
    x_start, x_end = p.endpoints(x0, noise, i)
    gs, ss = p.schedule.scalar(p.stages[i].t_start)
    ge, se = p.schedule.scalar(p.stages[i].t_end)
    up_prev = x0[:, :, ::4].repeat_interleave(2, dim=2)
    assert_close(x_start, gs * up_prev + ss * noise)
    assert_close(x_end, ge * x0[:, :, ::2] + se * noise)


def test_flow_target_is_the_derivative_in_u():
    p = TemporalPyramid("flow", 16, 3)
    x0 = _data()
    noise = _stage_noise(p, x0, 1)
    u, h = torch.full((2,), 0.3, dtype=F64), 1e-6
    xa, _, target = p.interpolate(x0, noise, 1, u)
    xb, _, _ = p.interpolate(x0, noise, 1, u + h)
    assert_close((xb - xa) / h, target, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cfg", [dict(), dict(reductions=(4, 2), partition=(1, 1, 2)), dict(anchor_first_frame=True)],
                         ids=str)
def test_global_flow_target_is_the_derivative_in_global_time(cfg):
    F = 17 if cfg.get("anchor_first_frame") else 16
    stage_p = TemporalPyramid("flow", F, 3, **cfg)
    global_p = TemporalPyramid("flow", F, 3, flow_velocity="global", **cfg)
    x0 = _data(F=F)
    for i in range(3):
        noise = _stage_noise(stage_p, x0, i)
        u, h = torch.full((2,), 0.3, dtype=F64), 1e-6
        xa, ta, target = global_p.interpolate(x0, noise, i, u)
        xb, tb, _ = global_p.interpolate(x0, noise, i, u + h)
        x_stage, t_stage, v_stage = stage_p.interpolate(x0, noise, i, u)
        assert torch.equal(xa, x_stage) and torch.equal(ta, t_stage)  # same path and times, only the target differs
        x_start, x_end = global_p.endpoints(x0, noise, i)
        span = global_p.stages[i].t_start - global_p.stages[i].t_end
        assert_close(target, (x_start - x_end) / span, rtol=1e-14, atol=1e-14)
        assert_close(target, v_stage / span, rtol=1e-14, atol=1e-14)
        assert_close((xb - xa) / (tb - ta).reshape(-1, 1, 1, 1, 1), target, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("partition", [(1, 1, 1), (1, 1, 2), (2, 1, 1)])
def test_global_flow_target_is_the_flow_target_of_the_stages_virtual_pair(partition):
    p = TemporalPyramid("flow", 16, 3, partition=partition, flow_velocity="global")
    x0 = _data()
    u = torch.tensor([0.25, 0.9], dtype=F64)
    for i in range(1, 3):  # stage 0 starts at pure noise (gamma_s = 0): tested below against vanilla
        noise = _stage_noise(p, x0, i)
        x_t, t, target = p.interpolate(x0, noise, i, u)
        x_start, x_end = p.endpoints(x0, noise, i)
        eps_k = p.stage_noise(x_start, x_end, i)  # Eq. 11 on the flow schedule
        gs, ss = p.schedule.scalar(p.stages[i].t_start)
        x_bar = (x_start - ss * eps_k) / gs  # the stage's virtual clean point
        assert_close(target, eps_k - x_bar, rtol=1e-12, atol=1e-12)
        tb = t.reshape(-1, 1, 1, 1, 1)
        assert_close(x_t, (1 - tb) * x_bar + tb * eps_k, rtol=1e-12, atol=1e-12)  # an ordinary flow pair


@pytest.mark.parametrize("reductions", [(2, 2), (4, 2)])
def test_global_flow_target_at_stage_0_is_vanilla_flow_matching_on_the_downsampled_clip(reductions):
    p = TemporalPyramid("flow", 16, 3, reductions, flow_velocity="global")
    x0 = _data()
    noise = _stage_noise(p, x0, 0)
    u = torch.tensor([0.1, 0.8], dtype=F64)
    x_t, t, target = p.interpolate(x0, noise, 0, u)
    down = p.downsample(x0, p.stages[0].stride)
    tb = t.reshape(-1, 1, 1, 1, 1)
    assert_close(target, noise - down, rtol=1e-13, atol=1e-13)
    assert_close(x_t, (1 - tb) * down + tb * noise, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("kwargs,match", [
    (dict(flow_velocity="x"), r"flow_velocity='x' is invalid; expected one of \['stage', 'global'\]"),
    (dict(schedule="ddim", flow_velocity="global"), "flow_velocity='global' is set for schedule='ddim'"),
])
def test_bad_flow_velocity_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TemporalPyramid(**{"num_frames": 16, **kwargs})


def test_longer_clips_keep_the_flow_velocity():
    assert TemporalPyramid("flow", 16, 3, flow_velocity="global").with_num_frames(32).flow_velocity == "global"


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_ddim_xt_and_target_agree_with_eq10_eq11(beta_schedule):
    p = TemporalPyramid(make_schedule("ddim", beta_schedule), 16, 3)
    x0 = _data()
    i = 1
    noise = _stage_noise(p, x0, i)
    u = torch.tensor([0.2, 0.7], dtype=F64)
    x_t, t, eps_k = p.interpolate(x0, noise, i, u)
    x_s, x_e = p.endpoints(x0, noise, i)
    gs, ss = p.schedule.scalar(p.stages[i].t_start)
    ge, se = p.schedule.scalar(p.stages[i].t_end)
    expected_eps = (x_e / ge - x_s / gs) / (se / ge - ss / gs)  # Eq. 11
    assert_close(eps_k, expected_eps)
    for b in range(2):
        gt, st = p.schedule.scalar(float(t[b]))
        eq10 = (gt / gs) * x_s[b] + gt * eps_k[b] * (st / gt - ss / gs)
        assert_close(x_t[b], eq10)
        x_bar = (x_s[b] - ss * eps_k[b]) / gs  # the stage's virtual clean point
        assert_close(x_t[b], gt * x_bar + st * eps_k[b])


@pytest.mark.parametrize("velocity", ["stage", "global"])
def test_one_stage_equals_vanilla_flow(velocity):
    p = TemporalPyramid("flow", 16, 1, flow_velocity=velocity)
    assert p.stages[0].stride == 1 and p.stages[0].t_start == 1.0 and p.stages[0].t_end == 0.0
    x0 = _data()
    noise = _stage_noise(p, x0, 0)
    u = torch.tensor([0.1, 0.8], dtype=F64)
    x_t, t, v = p.interpolate(x0, noise, 0, u)
    tb = t.reshape(-1, 1, 1, 1, 1)
    assert torch.equal(t, u)
    assert_close(x_t, (1 - tb) * x0 + tb * noise, rtol=0, atol=1e-15)
    assert_close(v, noise - x0, rtol=0, atol=1e-15)


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_one_stage_equals_vanilla_ddim(beta_schedule):
    p = TemporalPyramid(make_schedule("ddim", beta_schedule), 16, 1)
    x0 = _data()
    noise = _stage_noise(p, x0, 0)
    u = torch.tensor([0.1, 0.8], dtype=F64)
    x_t, t, eps = p.interpolate(x0, noise, 0, u)
    gamma, sigma = p.schedule.gamma_sigma(t)
    assert_close(x_t, gamma.reshape(-1, 1, 1, 1, 1) * x0 + sigma.reshape(-1, 1, 1, 1, 1) * noise, rtol=0, atol=1e-12)
    assert_close(eps, noise, rtol=0, atol=1e-12)


def test_noise_of_the_wrong_shape_is_a_clear_error():
    p = TemporalPyramid("flow", 16, 3)
    x0 = _data()
    with pytest.raises(ValueError, match=r"noise has shape \(2, 3, 16, 4, 4\); expected stage 0's shape \(2, 3, 4, 4, 4\)"):
        p.endpoints(x0, torch.randn(2, 3, 16, 4, 4, dtype=F64), 0)


def _renoise_statistics(p, i, n_samples, enabled=True):
    """Mean and covariance (over frames) of renoised stage-i end points for one fixed clip."""
    x0 = _data(B=1, C=1, F=p.num_frames, H=1, W=1, seed=3)
    stage, nxt = p.stages[i], p.stages[i + 1]
    ge, se = p.schedule.scalar(stage.t_end)
    g = torch.Generator().manual_seed(11)
    eps = torch.randn(n_samples, 1, stage.num_frames, 1, 1, generator=g, dtype=F64)
    x_end = ge * p.downsample(x0, stage.stride) + se * eps  # (N, 1, F_i, 1, 1)
    x_next = p.renoise(x_end, i, generator=g, enabled=enabled).reshape(n_samples, -1)  # (N, F_{i+1})
    gs, ss = p.schedule.scalar(nxt.t_start)
    mean_expected = (gs * p.start_content(x0, i + 1)).reshape(-1)
    centred = x_next - x_next.mean(0)
    cov = centred.T @ centred / (n_samples - 1)
    return x_next.mean(0), mean_expected, cov, ss**2 * torch.eye(cov.shape[0], dtype=F64)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("F,anchor,reductions", [(16, False, (2, 2)), (17, True, (2, 2)), (16, False, (4, 4)), (33, True, (4, 2))])
def test_renoise_matches_next_stage_start_by_monte_carlo(schedule, F, anchor, reductions):
    p = TemporalPyramid(_schedule(schedule), F, 3, reductions, anchor_first_frame=anchor)
    for i in range(2):
        mean, mean_expected, cov, cov_expected = _renoise_statistics(p, i, 100_000)
        scale = cov_expected[0, 0].item()
        assert_close(mean, mean_expected, atol=0.02 * math.sqrt(scale) + 1e-3, rtol=0)
        assert_close(cov, cov_expected, atol=0.03 * scale, rtol=0)


def test_renoise_off_does_not_restore_the_covariance():
    p = TemporalPyramid("flow", 16, 3)
    _, _, cov, cov_expected = _renoise_statistics(p, 0, 20_000, enabled=False)
    assert (cov - cov_expected).abs().max() > 0.1 * cov_expected[0, 0]


def test_renoise_noise_has_the_anti_correlated_pair_covariance():
    p = TemporalPyramid("flow", 4, 2)
    n = p.renoise_noise((200_000, 1, 2, 1, 1), 2, torch.Generator().manual_seed(0), dtype=F64).reshape(-1, 2)
    cov = n.T @ n / n.shape[0]
    assert_close(cov, torch.tensor([[0.5, -0.5], [-0.5, 0.5]], dtype=F64), atol=0.01, rtol=0)


def test_stage_sampling_follows_weights():
    p = TemporalPyramid("flow", 16, 3, partition=(2, 1, 1))
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([p.sample_stage(g) for _ in range(8000)]), minlength=3).double() / 8000
    assert_close(counts, torch.tensor([0.5, 0.25, 0.25], dtype=F64), atol=0.025, rtol=0)
    p = TemporalPyramid("flow", 16, 3, stage_weights=(0, 0, 1))
    assert {p.sample_stage(g) for _ in range(50)} == {2}


def test_anchored_endpoints_follow_eq7_with_explicit_frames():
    p = TemporalPyramid("flow", 9, 3, anchor_first_frame=True)  # strides 4, 2, 1: 3, 5, 9 frames
    x0 = _data(F=9)
    noise = _stage_noise(p, x0, 1)
    x_start, _ = p.endpoints(x0, noise, 1)
    gs, ss = p.schedule.scalar(p.stages[1].t_start)
    content = x0[:, :, [0, 4, 4, 8, 8]]  # Up(Down(x0, 4), 2) with frame 0 kept single
    assert_close(x_start, gs * content + ss * noise)


def test_ddim_partition_beyond_the_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match=r"reduction 4 .*log-SNR"):
        TemporalPyramid("ddim", 16, 3, reductions=(4, 4), partition=(1000, 1, 1))


def test_clip_of_the_wrong_length_is_a_clear_error():
    p = TemporalPyramid("flow", 16, 3)
    with pytest.raises(ValueError, match=r"expected \(B, C, 16, H, W\)"):
        p.endpoints(_data(F=8), torch.zeros(2, 3, 2, 4, 4, dtype=F64), 0)


def test_interpolate_keeps_time_in_float32_for_bf16_data():
    p = TemporalPyramid("flow", 16, 3)
    x0 = _data().to(torch.bfloat16)
    noise = torch.randn(p.stage_shape(x0, 1), dtype=torch.bfloat16)
    x_t, t, target = p.interpolate(x0, noise, 1, torch.ones(2))
    assert t.dtype == torch.float32 and x_t.dtype == torch.bfloat16
    assert float(t[0]) == pytest.approx(p.stages[1].t_start, abs=1e-7)
