"""Optimizer and clipping chosen together: every precision x clipping x fused choice the CPU runs either trains with
its gradients clipped, or stops at startup with one line naming the settings; none fails at a step."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from tpdiff_lightning.models.dit import VideoDiT
from tpdiff_lightning.models.text_encoder import T5TextEncoder
from tpdiff_lightning.training.fit_checks import fit_setup_problems
from tpdiff_lightning.training.gradient_clipping import clip_gradients
from tpdiff_lightning.training.module import TPDiffModule

CLIP = 1e-4  # far below any real gradient norm, so clipping always acts


def tiny_module(fused, ema_decay=None) -> TPDiffModule:
    torch.manual_seed(0)
    return TPDiffModule(backbone=functools.partial(VideoDiT, size="dit-tiny"),
                        text_encoder=T5TextEncoder(d_model=32, num_layers=1, d_ff=64),
                        clip={"num_frames": 4, "resolution": 16}, pyramid={"num_stages": 2}, optimization={"fused_optimizer": fused, "ema_decay": ema_decay, "warmup_steps": 1, "lr": 1e-3})


def loader() -> DataLoader:
    video = torch.rand(2, 3, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch = {"video": video, "caption": ["a red square", "a blue disc"]}
    return DataLoader([batch] * 4, batch_size=None)


class GradNorm(L.Callback):
    """Records the total gradient norm the optimizer stepped with (grads stay until the next zero_grad)."""

    def __init__(self):
        self.norms: list[float] = []
        self.fused: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        grads = [p.grad.float() for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        self.fused.append(bool(trainer.optimizers[0].defaults.get("fused")))


def fit(module, precision, clip, algorithm="norm", steps=2):
    recorder = GradNorm()
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, gradient_clip_val=clip,
                        gradient_clip_algorithm=algorithm, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder])
    trainer.fit(module, train_dataloaders=loader())
    return trainer, recorder


@pytest.mark.parametrize("fused", [None, True, False], ids=["fused-auto", "fused", "unfused"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_every_precision_and_fused_choice_trains_with_clipped_gradients(precision, fused, one_thread):
    trainer, recorder = fit(tiny_module(fused), precision, CLIP)
    assert trainer.global_step == 2
    assert recorder.fused == [fused is not False] * 2  # auto keeps the fused kernel: clipping no longer needs it off
    tolerance = 1.05 if precision == "bf16-true" else 1.0 + 1e-4  # bf16 weights: the norm is summed in bf16
    assert all(n <= CLIP * tolerance for n in recorder.norms), recorder.norms


def test_clipping_by_value_bounds_every_gradient(one_thread):
    module = tiny_module(None)
    fit(module, "bf16-mixed", CLIP, algorithm="value", steps=1)
    assert max(float(p.grad.abs().max()) for p in module.parameters() if p.grad is not None) <= CLIP


def test_without_clipping_gradients_are_untouched(one_thread):
    _, recorder = fit(tiny_module(None), "bf16-mixed", 0.0, steps=1)
    assert recorder.norms[0] > 100 * CLIP


class FakeFSDPRoot:
    def __init__(self):
        self.calls = []

    def clip_grad_norm_(self, value):
        self.calls.append(value)


def test_fsdp1_clips_by_norm_through_its_root_module():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    strategy = FSDPStrategy.__new__(FSDPStrategy)  # no process group needed to pick the method
    strategy._model = root = FakeFSDPRoot()
    trainer = SimpleNamespace(strategy=strategy, precision_plugin=None)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=1.0)
    clip_gradients(trainer, optimizer, 0.5, "norm")
    assert root.calls == [0.5]


def test_explicit_fused_with_fp16_scaler_and_clipping_is_refused_at_startup():
    from types import SimpleNamespace

    module = tiny_module(True)
    trainer = SimpleNamespace(strategy=object(), precision="16-mixed", gradient_clip_val=1.0,
                              gradient_clip_algorithm="norm", precision_plugin=SimpleNamespace(scaler=object()))
    problems = fit_setup_problems(trainer, module)
    assert len(problems) == 1 and "model.init_args.optimization.fused_optimizer=true" in problems[0]
    assert "trainer.precision=16-mixed" in problems[0] and "gradient_clip_val=1.0" in problems[0]
    trainer.gradient_clip_val = 0.0
    assert fit_setup_problems(trainer, module) == []
