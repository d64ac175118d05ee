"""The module's AdamW: fused where safe, and the fused kernel takes the same steps as the default one."""

import functools

import pytest
import torch
from torch import nn

from tpdiff_lightning.models.dit import VideoDiT
from tpdiff_lightning.models.text_encoder import T5TextEncoder
from tpdiff_lightning.training.module import TPDiffModule
from tpdiff_lightning.training.optimizer import fused_adamw_supported, make_adamw


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))


def test_fused_is_chosen_for_float_cpu_parameters():
    net = small_net()
    optimizer = make_adamw([{"params": list(net.parameters())}], lr=1e-3)
    assert optimizer.defaults["fused"] is True


@pytest.mark.parametrize("precision, strategy", [("16-mixed", ""), ("32-true", "DeepSpeedStrategy")])
def test_fused_is_not_chosen_where_lightning_cannot_use_it(precision, strategy):
    net = small_net()
    assert fused_adamw_supported(net.parameters(), "bf16-mixed", "DDPStrategy")
    assert not fused_adamw_supported(net.parameters(), precision, strategy)
    optimizer = make_adamw([{"params": list(net.parameters())}], lr=1e-3, precision=precision, strategy=strategy)
    assert not optimizer.defaults["fused"]


def test_fused_is_not_chosen_for_non_float_or_empty_parameters():
    assert not fused_adamw_supported([])
    assert not fused_adamw_supported([nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)])


def test_explicit_choice_wins():
    net = small_net()
    assert not make_adamw([{"params": list(net.parameters())}], lr=1e-3, fused=False).defaults["fused"]


def test_fused_and_default_kernels_take_the_same_steps():
    nets = [small_net(), small_net()]
    opts = [make_adamw([{"params": list(n.parameters())}], lr=1e-2, weight_decay=0.1, fused=f)
            for n, f in zip(nets, (True, False))]
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(*(n.parameters() for n in nets)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    initial = small_net()
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(initial.parameters(), nets[0].parameters()))


def test_module_uses_fused_adamw_unless_told_otherwise():
    def build(**optimization):
        return TPDiffModule(backbone=functools.partial(VideoDiT, size="dit-tiny"),
                            text_encoder=T5TextEncoder(d_model=32, num_layers=1), clip={"num_frames": 4, "resolution": 16},
                            pyramid={"num_stages": 2}, optimization={"lr": 1e-3, "text_lr_scale": 0.5, **optimization})
    optimizer = build().configure_optimizers()["optimizer"]
    assert optimizer.defaults["fused"] is True
    assert not build(fused_optimizer=False).configure_optimizers()["optimizer"].defaults["fused"]
