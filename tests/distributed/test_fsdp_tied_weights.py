"""FSDP(1) with bf16 mixed precision and a tied weight.

On an H200 (torch 2.11, CUDA) `configs/strategy/fsdp.yaml` with bf16-mixed failed at the first backward with
"attempting to assign a gradient with dtype 'c10::BFloat16' to a tensor with grad_dtype 'Float'", on FSDP(1)'s
shared-parameter path. The shared parameter was the default T5 text encoder's token embedding, registered as both
`model.shared` and `model.encoder.embed_tokens`. torch 2.13 on CPU does not raise that error, so the regression
tests here are structural: no shipped model trains a parameter under two names, and FSDP(1) startup refuses one
that does. The 2-process CPU run below drives the real module through FSDP(1) + MixedPrecision(bf16), gradient
accumulation under no_sync and the root's clip_grad_norm_, the path the fix relies on.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import T5EncoderModel

from tests.helpers.gloo import free_port, join_gloo_group
from tpdiff_lightning.models.text_encoder import TIED_EMBEDDING_KEY, T5TextEncoder
from tpdiff_lightning.training.fit_checks import fit_setup_problems, shared_parameters
from tpdiff_lightning.training.module import TPDiffModule


def small_encoder() -> T5TextEncoder:
    torch.manual_seed(0)
    return T5TextEncoder(d_model=32, num_layers=1, d_ff=64)


def test_the_t5_encoder_registers_its_token_embedding_once():
    encoder = small_encoder()
    assert shared_parameters(encoder) == []
    assert TIED_EMBEDDING_KEY not in encoder.state_dict()
    assert encoder.model.encoder.embed_tokens is encoder.model.shared  # the encoder still calls the same module


def test_the_forward_pass_equals_plain_t5_with_the_same_weights():
    encoder = small_encoder()
    plain = T5EncoderModel(encoder.model.config)
    missing, unexpected = plain.load_state_dict(encoder.model.state_dict(), strict=False)
    assert unexpected == [] and set(missing) <= {"encoder.embed_tokens.weight"}  # tied to shared in plain T5
    assert plain.encoder.embed_tokens.weight is plain.shared.weight
    emb, mask = encoder(["a red square moving left", ""])
    ids = encoder.tokenizer(["a red square moving left", ""], padding="longest", return_tensors="pt")
    ref = plain(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state
    torch.testing.assert_close(emb, ref, rtol=0, atol=0)


def test_checkpoints_that_hold_both_names_still_load_strictly():
    encoder = small_encoder()
    state = encoder.state_dict()
    state[TIED_EMBEDDING_KEY] = state["model.shared.weight"].clone() + 1.0  # as older checkpoints saved it
    state["model.shared.weight"] = state[TIED_EMBEDDING_KEY].clone()
    encoder.load_state_dict(state, strict=True)
    torch.testing.assert_close(encoder.model.encoder.embed_tokens.weight, state["model.shared.weight"])


def test_the_default_module_trains_no_parameter_under_two_names():
    module = TPDiffModule(text_encoder=small_encoder(), clip={"num_frames": 4, "resolution": 16}, pyramid={"num_stages": 2})
    assert shared_parameters(module) == []


def test_fsdp1_mixed_precision_refuses_a_tied_trainable_weight_at_startup():
    from lightning.pytorch.strategies import FSDPStrategy

    module = TPDiffModule(text_encoder=small_encoder(), clip={"num_frames": 4, "resolution": 16}, pyramid={"num_stages": 2}, optimization={"ema_decay": None})
    head = nn.Linear(4, 4)
    module.backbone.extra_a, module.backbone.extra_b = head, nn.Linear(4, 4)
    module.backbone.extra_b.weight = head.weight  # a user's backbone with a tied weight
    strategy = FSDPStrategy.__new__(FSDPStrategy)
    trainer = SimpleNamespace(strategy=strategy, precision="bf16-mixed", gradient_clip_val=1.0,
                              gradient_clip_algorithm="norm", precision_plugin=SimpleNamespace(scaler=None))
    problems = fit_setup_problems(trainer, module)
    assert len(problems) == 1, problems
    assert "backbone.extra_a.weight = backbone.extra_b.weight" in problems[0] and "bf16-mixed" in problems[0]
    trainer.precision = "32-true"
    assert fit_setup_problems(trainer, module) == []


class TrainingStep(nn.Module):
    """The module's stage loss as a forward pass: ``(x0, stage, seed) -> loss``."""

    def __init__(self, module: TPDiffModule):
        super().__init__()
        self.module = module

    def forward(self, x0, stage: int, seed: int):
        text, mask = self.module.text_encoder(["a red square", "a blue circle"])
        return self.module.stage_loss(x0, text, mask, stage, torch.Generator().manual_seed(seed))


def _fsdp1_bf16_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import MixedPrecision
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.t5.modeling_t5 import T5Block

    from tpdiff_lightning.models.dit import DiTBlock

    join_gloo_group(rank, port, 2)
    try:
        torch.manual_seed(0)
        module = TPDiffModule(text_encoder=T5TextEncoder(d_model=32, num_layers=1, d_ff=64), clip={"num_frames": 4, "resolution": 16}, pyramid={"num_stages": 2}, optimization={"ema_decay": None})
        bf16 = torch.bfloat16
        # FSDP runs the training step inside the root's forward, as Lightning's FSDPStrategy does.
        root = FSDP(TrainingStep(module), device_id=torch.device("cpu"), use_orig_params=True,
                    auto_wrap_policy=ModuleWrapPolicy({DiTBlock, T5Block}),
                    mixed_precision=MixedPrecision(param_dtype=bf16, reduce_dtype=bf16, buffer_dtype=bf16))
        optimizer = torch.optim.AdamW(root.parameters(), lr=1e-3)
        norms = []
        for step in range(2):
            for micro in range(2):  # gradient accumulation: the first micro-batch without a gradient sync
                context = root.no_sync() if micro == 0 else torch.enable_grad()
                with context:
                    x0 = torch.randn(2, 3, 4, 16, 16, generator=torch.Generator().manual_seed(10 * step + rank))
                    root(x0, micro % 2, step).backward()
            norms.append(float(root.clip_grad_norm_(1e-3)))
            optimizer.step()
            optimizer.zero_grad()
        torch.save({"norms": norms, "finite": all(torch.isfinite(torch.tensor(norms)).tolist())},
                   Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # skip the interpreter teardown, where FSDP(1)'s gloo threads have aborted a finished process


@pytest.mark.slow
def test_fsdp1_bf16_mixed_precision_trains_the_default_module_on_two_cpu_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_fsdp1_bf16_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn",
                       join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert all(r["finite"] for r in results), results
    assert results[0]["norms"] == results[1]["norms"]  # one global norm over both ranks' shards
    assert all(n > 1e-3 for n in results[0]["norms"])  # before clipping, so clipping acted
