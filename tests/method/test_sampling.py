import pytest
import torch
from torch.testing import assert_close

from tpdiff_lightning.method.pyramid import TemporalPyramid
from tpdiff_lightning.method.sampling import (
    guided,
    guided_one_pass,
    sample,
    shift_time,
    split_steps,
    stage_time_grid,
    unshift_time,
)

F64 = torch.float64
TABLE2 = [
    dict(num_stages=3),
    dict(num_stages=4),
    dict(num_stages=5),
    dict(num_stages=3, partition=(2, 1, 1)),
    dict(num_stages=3, partition=(1, 1, 2)),
    dict(num_stages=3, reductions=(4, 4)),
    dict(num_stages=3, reductions=(4, 2)),
    dict(num_stages=3, reductions=(2, 4)),
    dict(num_stages=1),
    dict(num_stages=2),
]


def test_split_steps():
    assert split_steps(30, (1, 1, 1)) == [10, 10, 10]
    assert split_steps(30, (1, 1, 2)) == [8, 7, 15]
    assert split_steps(30, (2, 1, 1)) == [15, 8, 7]
    assert split_steps(5, (1, 1, 1, 1, 1)) == [1] * 5
    assert split_steps(6, (100, 1, 1)) == [4, 1, 1]
    with pytest.raises(ValueError, match="num_steps=2.*3 stages"):
        split_steps(2, (1, 1, 1))


def _recording_model(p, calls):
    def model(x, t, stage):
        assert x.shape[2] == stage.num_frames  # the model really gets the stage's shorter clip
        assert torch.all((t <= stage.t_start + 1e-6) & (t >= stage.t_end - 1e-6))
        calls.append(stage.index)
        return 0.1 * x
    return model


@pytest.mark.parametrize("schedule", ["flow", "ddim"])
@pytest.mark.parametrize("cfg", TABLE2, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_every_configuration_samples(schedule, cfg):
    p = TemporalPyramid(schedule, 16, **cfg)
    calls = []
    out = sample(_recording_model(p, calls), p, 2, (3, 4, 4), num_steps=10,
                 generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 16, 4, 4) and torch.isfinite(out).all()
    assert [calls.count(i) for i in range(p.num_stages)] == split_steps(10, p.partition)
    assert calls == sorted(calls)


@pytest.mark.parametrize("schedule", ["flow", "ddim"])
def test_step_weights_move_steps_between_stages_and_each_stage_keeps_its_window(schedule):
    p = TemporalPyramid(schedule, 16, 3)
    calls = []
    sample(_recording_model(p, calls), p, 1, (3, 4, 4), num_steps=30, generator=torch.Generator().manual_seed(0),
           step_weights=[2, 2, 1])  # the recording model checks every t lies in its stage's window
    assert [calls.count(i) for i in range(3)] == [12, 12, 6]
    plain = sample(lambda x, t, s: 0.1 * x, p, 1, (3, 4, 4), 9, torch.Generator().manual_seed(0))
    same = sample(lambda x, t, s: 0.1 * x, p, 1, (3, 4, 4), 9, torch.Generator().manual_seed(0), step_weights=None)
    assert torch.equal(plain, same)
    for bad in ([1, 1], [1, 0, 1], [1, -2, 1]):
        with pytest.raises(ValueError, match=r"^step_weights=\[.*\] is invalid; expected 3 positive numbers"):
            sample(lambda x, t, s: x, p, 1, (3, 4, 4), 9, torch.Generator().manual_seed(0), step_weights=bad)


def test_guidance_and_renoise_switch_and_seed():
    p = TemporalPyramid("flow", 16, 3)
    cond = lambda x, t, s: 0.5 * x + 1.0
    uncond = lambda x, t, s: 0.5 * x
    g = lambda: torch.Generator().manual_seed(5)
    a = sample(guided(cond, uncond, 3.0), p, 2, (3, 4, 4), 9, g())
    b = sample(lambda x, t, s: 0.5 * x + 3.0, p, 2, (3, 4, 4), 9, g())
    assert_close(a, b)
    assert torch.equal(sample(cond, p, 2, (3, 4, 4), 9, g()), sample(cond, p, 2, (3, 4, 4), 9, g()))
    off = sample(cond, p, 2, (3, 4, 4), 9, g(), renoise=False)
    assert not torch.allclose(off, sample(cond, p, 2, (3, 4, 4), 9, g()))


def _flow_oracle(p, x0):
    """The exact stage-wise velocity for a single-clip data set, inverted from x_t."""
    def model(x, t, stage):
        i = stage.index
        u = (t - stage.t_end) / (stage.t_start - stage.t_end)
        gs, ss = p.schedule.scalar(stage.t_start)
        ge, se = p.schedule.scalar(stage.t_end)
        c_s, c_e = p.start_content(x0, i), p.downsample(x0, stage.stride)
        ub = u.reshape(-1, 1, 1, 1, 1).to(x.dtype)
        a = (1 - ub) * ge * c_e + ub * gs * c_s
        b = (1 - ub) * se + ub * ss
        eps = (x - a) / b
        return gs * c_s - ge * c_e + (ss - se) * eps
    return model


def _in_global_time(model):
    """A model predicting the global-time velocity of ``model``'s stage-time one: divided by ``s_i - e_i``."""
    return lambda x, t, stage: model(x, t, stage) / (stage.t_start - stage.t_end)


@pytest.mark.parametrize("cfg", TABLE2[:8], ids=str)
@pytest.mark.parametrize("velocity,shift", [("stage", 1.0), ("global", 1.0), ("global", 5.0), ("stage", 3.0)])
def test_oracle_flow_sampler_lands_on_the_data(cfg, velocity, shift):
    x0 = torch.randn(1, 2, 16, 3, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    p = TemporalPyramid("flow", 16, flow_velocity=velocity, **cfg)
    oracle = _flow_oracle(p, x0) if velocity == "stage" else _in_global_time(_flow_oracle(p, x0))
    out = sample(oracle, p, 1, (2, 3, 3), 20, torch.Generator().manual_seed(0), dtype=F64, timestep_shift=shift)
    assert_close(out, x0, atol=1e-9, rtol=0)


def _nonlinear_model(x, t, stage):
    """A stage-time velocity that depends on x, t and the stage, so that any mismatch in time or scale shows."""
    tb = t.reshape(-1, 1, 1, 1, 1).to(x.dtype)
    return 0.7 * torch.sin(x) * (1 + tb) - 0.4 * x * tb**2 + 0.1 * (stage.index + 1)


@pytest.mark.parametrize("cfg", [dict(num_stages=3), dict(num_stages=3, reductions=(4, 2), partition=(1, 1, 2)),
                                 dict(num_stages=4)], ids=str)
@pytest.mark.parametrize("shift", [1.0, 5.0])
def test_global_velocity_sampler_iterates_equal_the_stage_velocity_samplers(cfg, shift):
    def run(velocity, model):
        p = TemporalPyramid("flow", 16, flow_velocity=velocity, **cfg)
        steps = []
        out = sample(model, p, 2, (2, 3, 3), 13, torch.Generator().manual_seed(7), dtype=F64,
                     callback=lambda i, n, x: steps.append(x.clone()), timestep_shift=shift)
        return steps + [out]

    stage_iterates = run("stage", _nonlinear_model)
    global_iterates = run("global", _in_global_time(_nonlinear_model))
    assert len(stage_iterates) == len(global_iterates) == 14
    for a, b in zip(stage_iterates, global_iterates):
        assert_close(b, a, rtol=1e-12, atol=1e-12)
    # The same network read in the other time steps differently: the velocity choice is not a no-op.
    wrong = run("global", _nonlinear_model)
    assert (wrong[-1] - stage_iterates[-1]).abs().max() > 1e-2


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 8.0])
@pytest.mark.parametrize("num_steps", [8, 30])
def test_one_stage_with_a_shift_equals_diffusers_flow_match_euler(shift, num_steps):
    diffusers = pytest.importorskip("diffusers")
    np = pytest.importorskip("numpy")
    # diffusers' flow pipelines (Flux, SD3) pass the uniform grid linspace(1, 1/N, N) as sigmas; the scheduler
    # shifts it, appends sigma 0, tells the model sigma * 1000 and steps x += (sigma' - sigma) * v.
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps))
    z = torch.randn(1, 2, 8, 3, 3, generator=torch.Generator().manual_seed(0))

    def velocity(x, t):
        tb = t.reshape(-1, 1, 1, 1, 1)
        return 0.5 * torch.sin(3 * x) + tb * x - 0.2

    x, reference_times = z.clone(), []
    for timestep in scheduler.timesteps:
        reference_times.append(float(timestep) / 1000)
        x = scheduler.step(velocity(x, timestep.reshape(1) / 1000), timestep, x).prev_sample
    ours_times = []

    def model(x, t, stage):
        ours_times.append(float(t[0]))
        return velocity(x, t)

    p = TemporalPyramid("flow", 8, 1)
    out = sample(model, p, 1, (2, 3, 3), num_steps, torch.Generator().manual_seed(0), timestep_shift=shift)
    assert ours_times == pytest.approx(reference_times, abs=1e-6)
    assert_close(out, x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shift", [0.5, 3.0, 7.0])
def test_a_shift_reshapes_the_grid_inside_each_stage_without_moving_the_windows(shift):
    p = TemporalPyramid("flow", 16, 3)
    seen = []
    sample(lambda x, t, stage: (seen.append((stage.index, float(t[0]))), 0.1 * x)[1], p, 1, (1, 2, 2), 15,
           torch.Generator().manual_seed(0), dtype=F64, timestep_shift=shift)
    for stage, steps in zip(p.stages, split_steps(15, p.partition)):
        times = [t for i, t in seen if i == stage.index]
        grid = stage_time_grid(stage, steps, shift)
        assert float(grid[0]) == stage.t_start and float(grid[-1]) == stage.t_end  # the window stays
        assert times == pytest.approx(grid[:-1].tolist(), abs=1e-12)
        assert all(a > b for a, b in zip(grid[:-1], grid[1:]))
        # Uniform in the unshifted time: equal steps there, unequal ones in t.
        pre = unshift_time(grid, shift)
        assert_close(pre[1:] - pre[:-1], torch.full((steps,), float(pre[1] - pre[0]), dtype=F64), rtol=0, atol=1e-12)
        assert_close(shift_time(pre, shift), grid, rtol=0, atol=1e-12)
        uniform = torch.linspace(stage.t_start, stage.t_end, steps + 1, dtype=F64)
        assert (grid[1:-1] - uniform[1:-1]).abs().min() > 1e-4


@pytest.mark.parametrize("schedule,kwargs,match", [
    ("flow", dict(timestep_shift=0.0), r"timestep_shift=0.0 is invalid; expected a number > 0"),
    ("flow", dict(timestep_shift=-2.0), r"timestep_shift=-2.0 is invalid; expected a number > 0"),
    ("ddim", dict(timestep_shift=3.0), r"timestep_shift=3.0 is set for schedule='ddim'; expected 1"),
])
def test_bad_timestep_shift_is_a_clear_error(schedule, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample(lambda x, t, s: x, TemporalPyramid(schedule, 16, 3), 1, (1, 2, 2), 6, **kwargs)


@pytest.mark.parametrize("schedule", ["flow", "ddim"])
def test_one_generator_per_sample_gives_each_sample_its_one_at_a_time_result(schedule):
    p = TemporalPyramid(schedule, 16, 3)
    model = lambda x, t, stage: 0.3 * torch.tanh(x) + 0.05 * stage.index
    seeds = [3, 11, 4]
    batched = sample(model, p, 3, (2, 3, 3), 9, [torch.Generator().manual_seed(s) for s in seeds])
    alone = torch.cat([sample(model, p, 1, (2, 3, 3), 9, torch.Generator().manual_seed(s)) for s in seeds])
    assert torch.equal(batched, alone)
    with pytest.raises(ValueError, match="2 generators for a batch of 3; expected one per sample"):
        sample(model, p, 3, (2, 3, 3), 9, [torch.Generator().manual_seed(s) for s in seeds[:2]])


def test_guidance_in_one_pass_equals_two_passes():
    p = TemporalPyramid("flow", 16, 3)
    shift = torch.tensor([1.0, -2.0]).reshape(2, 1, 1, 1, 1)  # per-row "caption": cond rows then uncond rows
    calls = []

    def pair(x, t, stage):
        calls.append(x.shape[0])
        return 0.5 * torch.sin(x) + torch.cat([shift, torch.zeros_like(shift)])

    cond = lambda x, t, s: 0.5 * torch.sin(x) + shift
    uncond = lambda x, t, s: 0.5 * torch.sin(x)
    g = lambda: torch.Generator().manual_seed(5)
    one = sample(guided_one_pass(pair, 3.0), p, 2, (3, 4, 4), 9, g())
    two = sample(guided(cond, uncond, 3.0), p, 2, (3, 4, 4), 9, g())
    assert_close(one, two, rtol=1e-6, atol=1e-6)
    assert calls == [4] * 9  # one forward pass per step, over the doubled batch


def test_zero_shot_longer_clip():
    p = TemporalPyramid("flow", 16, 3).with_num_frames(32)
    calls = []
    out = sample(_recording_model(p, calls), p, 1, (3, 4, 4), 6, torch.Generator().manual_seed(0))
    assert out.shape[2] == 32 and [s.num_frames for s in p.stages] == [8, 16, 32]


def _ddim_oracle(p, x0):
    """The exact stage-wise noise eps_k for a single-clip data set: x_bar is fixed per stage (SPEC)."""
    def model(x, t, stage):
        i = stage.index
        gs, ss = p.schedule.scalar(stage.t_start)
        ge, se = p.schedule.scalar(stage.t_end)
        c_s, c_e = p.start_content(x0, i), p.downsample(x0, stage.stride)
        shift = (c_e - c_s) / (se / ge - ss / gs)  # eps_k = eps + shift
        x_bar = c_s - (ss / gs) * shift  # the stage's virtual clean point
        gamma, sigma = (v.reshape(-1, 1, 1, 1, 1).to(x.dtype) for v in p.schedule.gamma_sigma(t))
        return (x - gamma * x_bar) / sigma
    return model


@pytest.mark.parametrize("cfg", [dict(num_stages=1), dict(num_stages=3), dict(num_stages=3, reductions=(4, 2)),
                                 dict(num_stages=3, anchor_first_frame=True)], ids=str)
def test_oracle_ddim_sampler_is_exact_for_any_step_count(cfg):
    F = 17 if cfg.get("anchor_first_frame") else 16
    x0 = torch.randn(1, 2, F, 3, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    p = TemporalPyramid("ddim", F, **cfg)
    few = sample(_ddim_oracle(p, x0), p, 1, (2, 3, 3), p.num_stages, torch.Generator().manual_seed(0), dtype=F64)
    many = sample(_ddim_oracle(p, x0), p, 1, (2, 3, 3), 60, torch.Generator().manual_seed(0), dtype=F64)
    assert_close(few, many, atol=1e-10, rtol=0)
    # It ends on the last stage's end point gamma_0 x0 + sigma_0 eps for one unit-scale eps.
    g0, s0 = p.schedule.scalar(0.0)
    eps = (many - g0 * x0) / s0
    assert 0.3 < float(eps.std()) < 3.0


def test_time_stays_float32_for_half_precision_samples():
    p = TemporalPyramid("flow", 16, 3)
    seen = []

    def model(x, t, stage):
        seen.append((x.dtype, t.dtype, float(t[0])))
        return torch.zeros_like(x)

    sample(model, p, 1, (3, 4, 4), 3, torch.Generator().manual_seed(0), dtype=torch.bfloat16)
    assert all(xd == torch.bfloat16 and td == torch.float32 for xd, td, _ in seen)
    assert seen[1][2] == pytest.approx(p.stages[1].t_start, abs=1e-7)
