"""Scale-out: every strategy overlay parses and builds; DDP and FSDP2 fit and resume with 2 CPU processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from tests.conftest import CONFIGS, DEFAULT, ROOT, shrink_args
from tests.helpers.gloo import free_port, join_gloo_group

STRATEGIES = sorted((CONFIGS / "strategy").glob("*.yaml"))
STRATEGY_NAMES = [p.stem for p in STRATEGIES]
# Model configs: the default, and the overlays that change the model on top of it.
MODEL_CONFIGS = [[DEFAULT], [DEFAULT, CONFIGS / "ddim.yaml"], [DEFAULT, CONFIGS / "vanilla.yaml"]]
CUDA = torch.cuda.is_available()


class StageRecorder(L.Callback):
    """Test-only: appends ``rank step stage`` per training batch (the stage the module logged) and
    ``start rank step ema_updates`` when training starts, to ``<path>.rank<r>``."""

    def __init__(self, path: str):
        self.path = path

    def _write(self, trainer: L.Trainer, line: str) -> None:
        with open(f"{self.path}.rank{trainer.global_rank}", "a") as f:
            f.write(line + "\n")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ema = pl_module.ema
        self._write(trainer, f"start {trainer.global_rank} {trainer.global_step} {int(ema.num_updates) if ema else -1}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stage = int(trainer.callback_metrics["train/stage"])
        self._write(trainer, f"{trainer.global_rank} {trainer.global_step} {stage}")


def read_records(path: Path) -> tuple[dict[int, dict[int, int]], list[tuple[int, int, int]]]:
    """``({rank: {step: stage}}, [(rank, start_step, ema_updates), ...])`` from the recorder's files."""
    stages: dict[int, dict[int, int]] = {}
    starts = []
    for file in sorted(path.parent.glob(path.name + ".rank*")):
        for line in file.read_text().split("\n"):
            if line.startswith("start"):
                starts.append(tuple(int(v) for v in line.split()[1:]))
            elif line:
                rank, step, stage = map(int, line.split())
                stages.setdefault(rank, {})[step] = stage
    return stages, starts


@pytest.fixture(scope="module")
def cli_parser():
    from tpdiff_lightning.cli.main import main

    return main(["--config", str(DEFAULT), "--trainer.accelerator=cpu"], run=False).parser


def parse(parser, *configs: Path, extra: tuple[str, ...] = ()):
    args = [a for c in configs for a in ("--config", str(c))]
    return parser.parse_args([*args, *extra])


def test_there_are_the_six_strategy_overlays_each_with_a_usage_comment():
    assert STRATEGY_NAMES == ["context_parallel", "ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp", "fsdp2"]
    for path in STRATEGIES:
        text = path.read_text()
        assert text.startswith("#") and "--config configs/strategy/" in text, path
        assert "trainer" in yaml.safe_load(text), path


@pytest.mark.parametrize("model", MODEL_CONFIGS, ids=lambda ps: ps[-1].stem)
@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda p: p.stem)
def test_overlay_composes_with_each_model_config_bf16_and_accumulation(cli_parser, model, strategy):
    extra = ("--trainer.precision=bf16-mixed", "--trainer.accumulate_grad_batches=4")
    cfg = parse(cli_parser, *model, strategy, extra=extra)
    expected = yaml.safe_load(strategy.read_text())["trainer"]["strategy"]["class_path"]
    assert cfg.trainer.strategy.class_path == expected
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accumulate_grad_batches == 4
    # The overlay leaves the model alone (FSDP(1) and ZeRO-3 aside, which switch the EMA off).
    base = parse(cli_parser, *model)
    for key in ("pyramid.num_stages", "objective.schedule", "objective.alignment", "optimization.lr"):
        assert cfg.model.init_args[key] == base.model.init_args[key]


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_strategy_object_instantiates_with_the_yaml_settings(cli_parser, name):
    if name.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    cfg = parse(cli_parser, DEFAULT, CONFIGS / "strategy" / f"{name}.yaml")
    strategy = cli_parser.instantiate_classes(cfg).trainer.strategy
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        assert isinstance(strategy, DDPStrategy) and strategy._ddp_kwargs["find_unused_parameters"] is False
    elif name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy
        from torch.distributed.fsdp import ShardingStrategy

        from tpdiff_lightning.models.dit import DiTBlock

        assert isinstance(strategy, FSDPStrategy)
        assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD and strategy._state_dict_type == "sharded"
        assert DiTBlock in strategy.kwargs["auto_wrap_policy"]._module_classes
        assert DiTBlock in strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes
        assert strategy.kwargs["forward_prefetch"] is True  # dict_kwargs reach torch's FSDP
        assert cfg.model.init_args.optimization.ema_decay is None
    elif name in ("fsdp2", "context_parallel"):
        from tpdiff_lightning.distributed.fsdp2 import FSDP2Strategy

        assert isinstance(strategy, FSDP2Strategy) and strategy.fsdp2.reshard_after_forward is True
        assert "tpdiff_lightning.models.dit.DiTBlock" in strategy.fsdp2.block_classes
        assert strategy.context_parallel_size == (2 if name == "context_parallel" else 1)
    else:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        assert isinstance(strategy, DeepSpeedStrategy)
        assert strategy.config["zero_optimization"]["stage"] == int(name[-1])
        if name.endswith("3"):
            assert cfg.model.init_args.optimization.ema_decay is None


@pytest.mark.parametrize("name", ["deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_takes_its_micro_batch_size_from_the_data_settings(name, tiny_data_root):
    """Lightning's DeepSpeed strategy read the micro-batch size from the loader's batch sampler, which the project's
    streaming loader does not have ("'NoneType' object has no attribute 'batch_size'" on a GPU). The config's
    strategy formats its DeepSpeed config from the real DataModule here, without CUDA."""
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeedStrategy

    from tpdiff_lightning.cli.main import main

    cli = main(["--config", str(DEFAULT), "--config", str(CONFIGS / "strategy" / f"{name}.yaml"),
                "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.logger=false",
                "--trainer.accumulate_grad_batches=4", f"--data.init_args.root={tiny_data_root}",
                "--data.init_args.batch_size=3"], run=False)
    trainer, module = cli.trainer, cli.model
    trainer._data_connector.attach_data(module, datamodule=cli.datamodule)  # as trainer.fit does
    module.trainer = trainer
    strategy = trainer.strategy
    strategy._lightning_module = module
    strategy._format_batch_size_and_grad_accum_config()
    assert strategy.config["train_micro_batch_size_per_gpu"] == 3
    assert strategy.config["gradient_accumulation_steps"] == 4
    assert strategy.config["gradient_clipping"] == 1.0  # default.yaml's gradient_clip_val, clipped by DeepSpeed
    assert strategy.config["zero_optimization"]["stage"] == int(name[-1])
    stock = LightningDeepSpeedStrategy(stage=int(name[-1]))  # what the overlays used before
    stock._lightning_module = module
    with pytest.raises(AttributeError, match="batch_size"):
        stock._format_batch_size_and_grad_accum_config()


def test_fsdp2_strategy_rejects_an_unknown_dtype():
    from tpdiff_lightning.distributed.fsdp2 import FSDP2Strategy

    with pytest.raises(ValueError, match="'bf16'.*expected one of"):
        FSDP2Strategy(param_dtype="bf16")


def _fit(out: Path, data_root: Path, overlay: str, max_steps: int, extra: list[str]) -> None:
    """Run ``lightning_cli.py fit`` with 2 CPU processes and the strategy overlay, checkpointing every 2 steps."""
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"save_last": True, "every_n_train_steps": 2, "save_top_k": -1}},
        {"class_path": "tests.distributed.test_strategies.StageRecorder", "init_args": {"path": str(out / "stages")}},
    ]
    _cli("fit", out, data_root, overlay, [*shrink_args(out, data_root, max_steps=max_steps, steps_per_epoch=4,
                                                       callbacks=callbacks), *extra])


def _cli(command: str, out: Path, data_root: Path, overlay: str, args: list[str], timeout: int = 150) -> None:
    """Run ``lightning_cli.py <command>`` with 2 CPU processes and the strategy overlay; raise with stderr on failure."""
    cmd = [sys.executable, str(ROOT / "lightning_cli.py"), command, "--config", str(DEFAULT),
           "--config", str(CONFIGS / "strategy" / f"{overlay}.yaml"), *args,
           "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.limit_val_batches=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _last(out: Path) -> Path:
    return out / "synthetic" / "tpdiff-flow" / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_ddp_two_processes_share_the_stage_per_step_and_resume(tmp_path, tiny_data_root):
    out = tmp_path / "out"
    out.mkdir()
    _fit(out, tiny_data_root, "ddp", 4, [])
    assert torch.load(_last(out), map_location="cpu", weights_only=False)["global_step"] == 4
    _fit(out, tiny_data_root, "ddp", 6, ["--ckpt_path", "last"])
    assert torch.load(_last(out), map_location="cpu", weights_only=False)["global_step"] == 6
    stages, starts = read_records(out / "stages")
    assert sorted(starts) == [(0, 0, 0), (0, 4, 4), (1, 0, 0), (1, 4, 4)]  # resumed at step 4 with its EMA
    assert set(stages) == {0, 1} and sorted(stages[0]) == [1, 2, 3, 4, 5, 6]
    assert stages[0] == stages[1]
    assert len(set(stages[0].values())) > 1  # the stage does change from step to step


@pytest.mark.slow
def test_ddp_independent_stage_draws_differ_across_ranks(tmp_path, tiny_data_root):
    out = tmp_path / "out"
    out.mkdir()
    # Stages drawn alike, so two independent draws are likely to differ within 8 steps (under the default's
    # [8, 1, 1] both ranks can draw the noisiest stage throughout).
    _fit(out, tiny_data_root, "ddp", 8, ["--model.init_args.objective.stage_sync=false",
                                         "--model.init_args.pyramid.stage_weights=null"])
    stages, _ = read_records(out / "stages")
    assert sorted(stages[0]) == sorted(stages[1]) == list(range(1, 9))
    assert any(stages[0][s] != stages[1][s] for s in stages[0])


@pytest.mark.slow
def test_ddp_with_global_alignment_fits(tmp_path, tiny_data_root):
    out = tmp_path / "out"
    out.mkdir()
    _fit(out, tiny_data_root, "ddp", 2, ["--model.init_args.objective.alignment_scope=global"])
    assert torch.load(_last(out), map_location="cpu", weights_only=False)["global_step"] == 2


@pytest.mark.slow
def test_fsdp2_two_cpu_processes_fit_resume_from_a_sharded_checkpoint_and_predict(tmp_path, tiny_data_root):
    out = tmp_path / "out"
    out.mkdir()
    _fit(out, tiny_data_root, "fsdp2", 2, [])
    last = _last(out)
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2  # one shard file per rank
    assert torch.load(last / "meta.pt", map_location="cpu", weights_only=False)["global_step"] == 2
    _fit(out, tiny_data_root, "fsdp2", 4, ["--ckpt_path", "last"])
    assert torch.load(last / "meta.pt", map_location="cpu", weights_only=False)["global_step"] == 4
    stages, starts = read_records(out / "stages")
    assert sorted(starts) == [(0, 0, 0), (0, 2, 2), (1, 0, 0), (1, 2, 2)]  # the sharded EMA came back too
    assert stages[0] == stages[1] and sorted(stages[0]) == [1, 2, 3, 4]
    # Three prompts over two sharded ranks: one rank gets a placeholder, so both run the same forward passes
    # (otherwise one rank would wait forever in an all-gather) and only the three real clips are written.
    prompts = "[a red square moving right fast, a blue circle moving up slow, a green square moving left fast]"
    _cli("predict", out, tiny_data_root, "fsdp2",
         [*shrink_args(out, tiny_data_root), f"--data.init_args.predict_prompts={prompts}",
          "--data.init_args.batch_size=1", "--model.init_args.sampling.steps=3", "--return_predictions=false",
          "--ckpt_path", str(last)])
    mp4s = sorted(p.name for p in out.rglob("predictions/*.mp4"))
    assert [name[:4] for name in mp4s] == ["0000", "0001", "0002"], mp4s
    assert {name.rsplit("_", 1)[1] for name in mp4s} == {"rank0.mp4", "rank1.mp4"}


def _fsdp2_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from tpdiff_lightning.distributed.fsdp2 import FSDP2Settings, apply_fsdp2
    from tpdiff_lightning.models.text_encoder import T5TextEncoder
    from tpdiff_lightning.training.module import TPDiffModule
    from tpdiff_lightning.training.optimizer import fused_adamw_supported

    join_gloo_group(rank, port, 2)
    try:
        torch.manual_seed(0)
        module = TPDiffModule(text_encoder=T5TextEncoder(d_model=32, num_layers=1, d_ff=64), clip={"num_frames": 4, "resolution": 16}, pyramid={"num_stages": 2}, optimization={"ema_decay": 0.5})
        full = {n: p.detach().clone() for n, p in module.denoiser_modules().named_parameters()}
        apply_fsdp2(module, init_device_mesh("cpu", (2,)), FSDP2Settings(activation_checkpointing=True))
        params = dict(module.denoiser_modules().named_parameters())
        result = {"all_dtensor": all(isinstance(p, DTensor) for p in params.values()),
                  "names_kept": sorted(params) == sorted(full),
                  "ema_dtensor": all(isinstance(s, DTensor) and s.placements == params[n].placements
                                     for n, s in zip(module.ema.names, module.ema.shadows()))}
        x0 = torch.randn(2, 3, 4, 16, 16, generator=torch.Generator().manual_seed(rank))
        text, mask = module.text_encoder(["a red square", "a blue circle"])
        module.train()
        loss = module.stage_loss(x0, text, mask, 1, torch.Generator().manual_seed(rank))
        loss.backward()
        with torch.no_grad():
            for p in params.values():
                p.add_(p.grad, alpha=-0.1)  # a plain SGD step on the shards
        before = [s.full_tensor().clone() for s in module.ema.shadows()]
        decay = module.ema.current_decay()
        module.ema.update(module.denoiser_modules())
        result["ema_lerp_err"] = max(
            float((s.full_tensor() - (decay * b + (1 - decay) * params[n].full_tensor())).abs().max())
            for n, s, b in zip(module.ema.names, module.ema.shadows(), before))
        trained = [p.full_tensor().clone() for p in params.values()]
        with module.ema.applied(module.denoiser_modules()):
            result["applied_err"] = max(float((p.full_tensor() - s.full_tensor()).abs().max())
                                        for p, s in zip(params.values(), module.ema.shadows()))
        result["restored"] = all(torch.equal(p.full_tensor(), t) for p, t in zip(params.values(), trained))
        result["moved"] = any(not torch.equal(p.full_tensor(), full[n]) for n, p in params.items())
        result["fused_adamw"] = fused_adamw_supported(params.values())  # DTensor shards: left to torch's default
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_apply_fsdp2_shards_the_trained_parts_and_the_ema_follows(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_fsdp2_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert r["all_dtensor"] and r["names_kept"] and r["ema_dtensor"], r
        assert r["moved"] and r["restored"], r
        assert r["ema_lerp_err"] < 1e-6 and r["applied_err"] == 0.0, r
        assert r["fused_adamw"] is False, r


def test_find_blocks_prefers_known_classes_then_falls_back_to_module_lists():
    from torch import nn

    from tpdiff_lightning.distributed.fsdp2 import find_blocks, import_class
    from tpdiff_lightning.models.dit import DiTBlock, VideoDiT

    dit = VideoDiT(3, 16)
    blocks = find_blocks(dit, [DiTBlock])
    assert len(blocks) == len(dit.blocks) and all(isinstance(b, DiTBlock) for b in blocks)
    fallback = nn.Sequential(nn.Linear(2, 2), nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)]))
    assert find_blocks(fallback, [DiTBlock]) == list(fallback[1])
    assert import_class("not_a_package.Block") is None
    with pytest.raises(ValueError, match="'DiTBlock'.*dotted class path"):
        import_class("DiTBlock")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("name", ["fsdp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3", "ddp"])
def test_gpu_fit_bf16_and_resume(name, tmp_path, tiny_data_root):
    """Each GPU strategy overlay on every visible GPU, with the default config's clipping, fused AdamW and EMA
    (where the overlay keeps it), bf16-mixed and accumulation; DDP only where there are 2+ GPUs."""
    if name.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    if name == "ddp" and torch.cuda.device_count() < 2:
        pytest.skip("DDP on GPUs needs 2+ devices (it runs on 2 CPU processes in the tests above)")
    from tpdiff_lightning.cli.main import main

    out = tmp_path / "out"
    devices = str(torch.cuda.device_count())
    args = ["fit", "--config", str(DEFAULT), "--config", str(CONFIGS / "strategy" / f"{name}.yaml"),
            *shrink_args(out, tiny_data_root, max_steps=2), "--trainer.precision=bf16-mixed",
            "--trainer.accumulate_grad_batches=2", f"--trainer.devices={devices}"]
    cli = main(args)
    assert cli.trainer.global_step == 2 and torch.isfinite(cli.trainer.logged_metrics["train/loss"])
    cli = main([*args, "--trainer.max_steps=3", "--ckpt_path", "last"])
    assert cli.trainer.global_step == 3


@pytest.mark.slow
def test_stage_sync_bench_quick_writes_json(tmp_path):
    out = tmp_path / "stage_sync.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "stage_sync.py"), "--quick", "--out", str(out)],
                   check=True, cwd=ROOT, capture_output=True)
    result = json.loads(out.read_text())
    assert len(result["stages"]) == 3 and all(s["step_s"] > 0 for s in result["stages"])
    # The slowest of 4 independent draws is never faster than one shared draw.
    assert result["expected_step_s"]["independent"] >= result["expected_step_s"]["sync"]


def _fsdp1_frozen_filter_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import StateDictType

    from tpdiff_lightning.models.weights_folder import exclude_frozen_from_state_dict

    join_gloo_group(rank, port, 2)
    try:
        torch.manual_seed(0)
        part = nn.Module()
        part.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]).requires_grad_(False)  # the frozen base
        part.register_buffer("table", torch.ones(3))
        part.adapter = nn.Linear(4, 4)  # trained
        owner = nn.Module()
        owner.backbone, owner.head = part, nn.Linear(4, 2)
        exclude_frozen_from_state_dict(owner, "backbone")
        plain = sorted(owner.state_dict())
        cpu = torch.device("cpu")
        part.blocks[0] = FSDP(checkpoint_wrapper(part.blocks[0]), device_id=cpu, use_orig_params=True)
        part.blocks[1] = FSDP(part.blocks[1], device_id=cpu, use_orig_params=True)
        root = FSDP(owner, device_id=cpu, use_orig_params=True)
        result = {"plain": plain, "wrapped_names": sorted(n for n, _ in owner.named_parameters())}
        for kind in (StateDictType.FULL_STATE_DICT, StateDictType.SHARDED_STATE_DICT):
            with FSDP.state_dict_type(root, kind):
                result[kind.name] = sorted(root.state_dict())
        with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT):
            root.load_state_dict(root.state_dict(), strict=True)  # the frozen keys' absence is accepted
        torch.save(result, Path(out_dir) / f"fsdp1_rank{rank}.pt")
        dist.barrier()  # neither rank tears the group down while the other may still be in a collective
    finally:
        dist.destroy_process_group()
    # Done and saved: skip the interpreter's teardown, where FSDP(1)'s gloo threads once aborted a process
    # ("terminate called without an active exception") after everything had passed. Errors above still raise.
    os._exit(0)


@pytest.mark.slow
def test_frozen_weights_stay_out_of_fsdp1_state_dicts(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_fsdp1_frozen_filter_worker, args=(free_port(), str(tmp_path)), nprocs=2,
                       start_method="spawn", join=True)
    expected = ["backbone.adapter.bias", "backbone.adapter.weight", "head.bias", "head.weight"]
    for rank in range(2):
        r = torch.load(tmp_path / f"fsdp1_rank{rank}.pt")
        assert r["plain"] == expected
        assert any("_fsdp_wrapped_module." in n for n in r["wrapped_names"]), r["wrapped_names"]  # really wrapped
        assert r["FULL_STATE_DICT"] == expected, r
        assert r["SHARDED_STATE_DICT"] == expected, r
