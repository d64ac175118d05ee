import pytest
import torch
from torch.testing import assert_close

from tpdiff_lightning.pyramid import TemporalPyramid
from tpdiff_lightning.sampling import guided, sample, split_steps

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


@pytest.mark.parametrize("cfg", TABLE2[:8], ids=str)
def test_oracle_flow_sampler_lands_on_the_data(cfg):
    x0 = torch.randn(1, 2, 16, 3, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    p = TemporalPyramid("flow", 16, **cfg)
    out = sample(_flow_oracle(p, x0), p, 1, (2, 3, 3), 20, torch.Generator().manual_seed(0), dtype=F64)
    assert_close(out, x0, atol=1e-9, rtol=0)


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
