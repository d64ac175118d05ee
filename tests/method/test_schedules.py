import math

import pytest
import torch
from torch.testing import assert_close

from tpdiff_lightning.method.schedules import DDIMSchedule, FlowSchedule, make_schedule


def test_flow_coefficients_and_end_points():
    s = FlowSchedule()
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    gamma, sigma = s.gamma_sigma(t)
    assert_close(gamma, 1 - t)
    assert_close(sigma, t)
    assert float(s.gamma_sigma(torch.tensor(0.0, dtype=torch.float64)).sigma) == 0.0
    assert float(s.gamma_sigma(torch.tensor(1.0, dtype=torch.float64)).gamma) == 0.0


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_ddim_matches_the_diffusers_discrete_table_at_integer_steps(beta_schedule):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule=beta_schedule,
                                  num_train_timesteps=1000)
    ac = ref.alphas_cumprod.to(torch.float64)
    s = make_schedule("ddim", beta_schedule=beta_schedule)
    assert s.beta_schedule == beta_schedule
    n = torch.arange(1000, dtype=torch.float64)
    gamma, sigma = s.gamma_sigma(n / 999)
    # diffusers builds its table in float32; ours is float64.
    assert_close(gamma**2, ac, rtol=1e-5, atol=1e-7)
    # Exactly the discrete table at integer steps.
    assert torch.equal(gamma, s.gamma_table) and torch.equal(sigma, s.sigma_table)


def test_ddim_interpolates_log_snr_linearly_between_steps():
    s = DDIMSchedule()
    n = 417
    t = torch.tensor([(n + 0.25) / 999], dtype=torch.float64)
    expected = 0.75 * s.lam_table[n] + 0.25 * s.lam_table[n + 1]
    assert_close(s.log_snr(t), expected.reshape(1))
    gamma, sigma = s.gamma_sigma(t)
    assert_close(torch.log(gamma / sigma), expected.reshape(1))
    assert_close(gamma**2 + sigma**2, torch.ones(1, dtype=torch.float64))


@pytest.mark.parametrize("name,beta_schedule", [("flow", None), ("ddim", None), ("ddim", "linear")])
def test_log_snr_round_trip_and_monotone(name, beta_schedule):
    s = make_schedule(name, beta_schedule)
    t = torch.linspace(0.01, 0.99, 97, dtype=torch.float64)
    lam = s.log_snr(t)
    assert torch.all(lam[1:] < lam[:-1])
    assert_close(s.t_from_log_snr(lam), t, atol=1e-9, rtol=0)
    assert_close(s.snr(t), torch.exp(2 * lam))


def test_sd15_is_the_default_beta_schedule_and_linear_differs_from_it():
    assert DDIMSchedule().beta_schedule == make_schedule("ddim").beta_schedule == "scaled_linear"
    assert torch.equal(make_schedule("ddim", "scaled_linear").lam_table, DDIMSchedule().lam_table)
    linear, sd15 = make_schedule("ddim", "linear"), DDIMSchedule()
    # Same end betas, but linear betas grow faster early: less signal left at the middle of the schedule.
    assert float(linear.alphas_cumprod[500]) < float(sd15.alphas_cumprod[500]) - 0.05


@pytest.mark.parametrize("kwargs,match", [
    (dict(schedule="ddim", beta_schedule="cosine"), r"beta_schedule='cosine' is unknown; expected one of \['scaled_linear', 'linear'\]"),
    (dict(schedule="flow", beta_schedule="linear"), r"beta_schedule='linear' is set for schedule='flow'; expected it only with schedule='ddim'"),
])
def test_bad_beta_schedule_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(**kwargs)
    with pytest.raises(ValueError, match="beta_schedule='cosine'"):
        DDIMSchedule(beta_schedule="cosine")


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match=r"schedule='edm'.*'ddim', 'flow'"):
        make_schedule("edm")


def test_timestep_scales():
    assert FlowSchedule().timestep_scale == 1000.0
    assert DDIMSchedule().timestep_scale == 999.0
    assert math.isclose(DDIMSchedule().scalar(1.0)[0], float(DDIMSchedule().gamma_table[-1]))
