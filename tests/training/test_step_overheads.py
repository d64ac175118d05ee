"""Per-step fixed costs of training: the method's numbers stay the same, and no step reads back from the device."""

from __future__ import annotations

import pytest
import torch

from tpdiff_lightning.training.ema import EMA
from tpdiff_lightning.training.module import TPDiffModule


def fixed_batch_run() -> tuple[list[float], list[float], float]:
    """Three training steps on one fixed batch (optimizer and EMA included), then each stage's loss at a fixed
    seed, and the EMA's distance from the weights."""
    torch.manual_seed(0)
    m = TPDiffModule(clip={"num_frames": 16, "resolution": 16}, optimization={"ema_decay": 0.9}, sampling={"steps": 6})
    m.log = lambda *a, **k: None
    g = torch.Generator().manual_seed(0)
    batch = {"video": torch.rand(4, 3, 16, 16, 16, generator=g) * 2 - 1,
             "caption": ["a red square moving right fast", "a blue circle", "", "a green cross moving up"]}
    opt = m.configure_optimizers()["optimizer"]
    losses = []
    for k in range(3):
        loss = m.training_step(batch, k)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.ema.update(m.denoiser_modules())
    x0 = m.batch_latents(batch)
    text, mask = m.text_encoder(batch["caption"])
    with torch.no_grad():
        stage = [m.stage_loss(x0, text, mask, i, torch.Generator().manual_seed(7)).item() for i in range(3)]
    params = m.ema._params(m.denoiser_modules())
    return losses, stage, sum(float((s.double() - p.double()).abs().sum()) for s, p in zip(m.ema.shadows(), params))


def test_the_loss_of_a_fixed_batch_is_unchanged(one_thread):
    # Measured with the code before the per-step overheads were removed (commit d673ea0), float32, one thread.
    losses, stage, ema = fixed_batch_run()
    assert losses == pytest.approx([0.36888590455055237, 0.3688635528087616, 0.36884117126464844], abs=1e-6)
    assert stage == pytest.approx([0.22486452758312225, 0.30133184790611267, 0.3682743012905121], abs=1e-6)
    assert ema == pytest.approx(0.2302799322473746, rel=1e-6)  # the EMA's lag behind the weights


def host_reads(fn) -> int:
    """How many scalars ``fn`` copies from a tensor to the host (each one a device sync on a GPU)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::_local_scalar_dense", "aten::is_nonzero"))


def test_the_ema_update_reads_nothing_back_from_the_device():
    model = torch.nn.Linear(4, 4)
    ema = EMA(model, decay=0.99)
    ema.update(model)  # the first update may read the stored count once
    assert host_reads(lambda: [ema.update(model) for _ in range(3)]) == 0
    assert int(ema.num_updates) == 4 and ema.current_decay() == pytest.approx(min(0.99, 5 / 14))


def test_the_ema_count_follows_a_loaded_state_dict():
    model = torch.nn.Linear(4, 4)
    ema = EMA(model, decay=0.999)
    for _ in range(3):
        ema.update(model)
    other = EMA(model, decay=0.999)
    other.num_updates.fill_(500)
    ema.load_state_dict(other.state_dict())
    assert ema.current_decay() == pytest.approx(501 / 510)
    ema.update(model)
    assert int(ema.num_updates) == 501 and ema.current_decay() == pytest.approx(502 / 511)


def test_the_training_steps_own_checks_read_the_device_once(monkeypatch):
    """The finite-input and finite-loss checks share one host read (each read is a device sync on a GPU)."""
    import sys

    torch.manual_seed(0)
    m = TPDiffModule(clip={"num_frames": 16, "resolution": 16}, optimization={"ema_decay": None}, objective={"alignment": False}, sampling={"steps": 6})
    m.log = lambda *a, **k: None
    g = torch.Generator().manual_seed(0)
    batch = {"video": torch.rand(4, 3, 16, 16, 16, generator=g) * 2 - 1, "caption": ["a red square", "b", "c", "d"]}
    reads = []
    for name in ("__bool__", "item", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            caller = sys._getframe(1).f_code.co_name
            if caller in ("training_step", "check_finite_input"):
                reads.append(caller)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    m.training_step(batch, 0)
    assert reads == ["training_step"]


# --- Host-device traffic, counted on the meta device (tests/helpers/device_traffic.py) -------------------------------

def _meta_module(schedule: str = "flow", **objective) -> TPDiffModule:
    torch.manual_seed(0)
    return TPDiffModule(clip={"num_frames": 16, "resolution": 16}, optimization={"ema_decay": None},
                        objective={"alignment": False, "schedule": schedule, **objective}).to("meta")


@pytest.mark.parametrize("schedule, velocity", [("flow", "stage"), ("flow", "global"), ("ddim", "stage")])
def test_a_training_steps_targets_copy_nothing_to_the_device(schedule, velocity):
    """Stage windows, coefficients and the DDIM tables reach the device once, not on every step."""
    from tests.helpers.device_traffic import device_traffic

    m = _meta_module(schedule, flow_velocity=velocity)
    x0 = torch.zeros(2, 3, 16, 16, 16, device="meta")
    text, mask = torch.zeros(2, 5, 128, device="meta"), torch.ones(2, 5, dtype=torch.bool, device="meta")
    for i in range(3):
        m.stage_loss(x0, text, mask, i)  # first use: a DDIM schedule copies its tables to the device once
    for i in range(3):
        traffic = device_traffic(lambda: m.stage_loss(x0, text, mask, i).backward())
        assert traffic.to_device == [] and traffic.reads == [], (i, traffic)


@pytest.mark.parametrize("schedule", ["flow", "ddim"])
def test_sampling_copies_per_stage_not_per_step_and_reads_nothing(schedule):
    """The initial noise, each renoise draw and each stage's time grid are copied once per stage; doubling the
    steps adds no copy, and nothing is read back."""
    from tests.helpers.device_traffic import device_traffic
    from tpdiff_lightning.method.sampling import sample

    m = _meta_module(schedule)
    text, mask = torch.zeros(1, 5, 128, device="meta"), torch.ones(1, 5, dtype=torch.bool, device="meta")
    model = m.denoiser(m.backbone, text, mask)

    def run(steps):
        return lambda: sample(model, m.pyramid, 2, (3, 16, 16), steps, torch.Generator().manual_seed(0),
                              device="meta")
    run(6)()
    short, long = device_traffic(run(6)), device_traffic(run(12))
    assert short.reads == [] and long.reads == []
    assert len(long.to_device) == len(short.to_device) <= 3 * m.pyramid.num_stages, long.to_device


def test_the_flux_style_forward_reads_nothing_back():
    """The caption mask is applied whatever its values: branching on them would read it back every forward."""
    from tests.helpers.device_traffic import device_traffic
    from tests.helpers.tiny_flux import tiny_flux_config
    from tpdiff_lightning.models.flux_video import FluxVideoBackbone

    net = FluxVideoBackbone(4, 32, config=tiny_flux_config(4, 32)).to("meta")
    x, t = torch.zeros(2, 4, 4, 8, 8, device="meta"), torch.zeros(2, device="meta")
    text, mask = torch.zeros(2, 6, 32, device="meta"), torch.ones(2, 6, dtype=torch.bool, device="meta")
    traffic = device_traffic(lambda: net(x, t, text, mask, stride=2))
    assert traffic.reads == [], traffic.reads
