"""FSDP2 (``fully_shard``) for TPDiffModule under Lightning's ModelParallelStrategy.

``TPDiffModule.configure_model`` calls ``apply_fsdp2(module, mesh)`` when the strategy hands it a device mesh.
Each transformer/UNet block of the trained parts is sharded on its own (so only one block's full weights
exist at a time), then each part's root; frozen parts (a frozen text encoder, the codec) stay replicated.
The EMA is re-created afterwards so its shadows are DTensors sharded like the weights they follow.

Lightning's mesh is 2-D, ``("data_parallel", "tensor_parallel")``. TPDiff has no tensor parallelism, so the
whole mesh is handed to ``fully_shard`` as an HSDP mesh: parameters are sharded across dim 1 and replicated
across dim 0. With the strategy's defaults (``data_parallel_size`` = nodes, ``tensor_parallel_size`` = GPUs
per node) that shards within a node and replicates across nodes; ``data_parallel_size: 1`` with
``tensor_parallel_size`` = world size shards over every GPU. Every rank still reads its own data: the data
module splits by global rank, not by the mesh.

With ``context_parallel_size`` > 1 the mesh's second dim is a context-parallel group instead
(``tpdiff_lightning.distributed.context_parallel``): its ranks read the same clips and split each clip's tokens.
The weights are then sharded over every rank, and the gradients summed over each group and averaged over the
data-parallel replicas.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, Sequence

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from tpdiff_lightning.distributed.context_parallel import (ATTENTION_MODES, DEFAULT_MIN_TOKENS, ContextParallel,
                                                           build_subgroups)

DEFAULT_BLOCK_CLASSES = (
    "tpdiff_lightning.models.dit.DiTBlock",
    "diffusers.models.transformers.transformer_wan.WanTransformerBlock",
    "diffusers.models.transformers.transformer_flux.FluxTransformerBlock",
    "diffusers.models.transformers.transformer_flux.FluxSingleTransformerBlock",
    "diffusers.models.unets.unet_motion_model.CrossAttnDownBlockMotion",
    "diffusers.models.unets.unet_motion_model.DownBlockMotion",
    "diffusers.models.unets.unet_motion_model.UNetMidBlockCrossAttnMotion",
    "diffusers.models.unets.unet_motion_model.CrossAttnUpBlockMotion",
    "diffusers.models.unets.unet_motion_model.UpBlockMotion",
    "transformers.models.t5.modeling_t5.T5Block",
    "transformers.models.umt5.modeling_umt5.UMT5Block",
    "transformers.models.clip.modeling_clip.CLIPEncoderLayer",
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class FSDP2Settings:
    """How ``apply_fsdp2`` shards; the ``FSDP2Strategy`` YAML arguments of the same names set it."""

    block_classes: Sequence[str] = DEFAULT_BLOCK_CLASSES
    """Class paths of the blocks sharded one by one; the ones that do not import are skipped. A part with none
    of them falls back to the children of its ``nn.ModuleList``s."""
    activation_checkpointing: bool = False
    """Recompute each block in the backward pass (keeps parameter names, so checkpoints and EMA are unchanged)."""
    reshard_after_forward: bool = True
    """Free the gathered weights after forward (ZeRO-3 like); ``False`` keeps them for backward (ZeRO-2 like)."""
    param_dtype: str | None = None
    """Dtype of the gathered weights in compute (``"bfloat16"``); ``None`` keeps float32 and lets autocast decide."""
    reduce_dtype: str | None = None
    """Dtype of the gradient reduce-scatter; ``None`` is ``param_dtype``."""
    extra_block_classes: Sequence[str] = field(default_factory=tuple)
    """More class paths, added to ``block_classes`` (for a backbone of your own)."""


def import_class(path: str) -> type | None:
    """The class at ``"package.module.Class"``, or ``None`` when its package is not installed."""
    module_name, _, name = path.rpartition(".")
    if not module_name:
        raise ValueError(f"block class {path!r} is not a dotted class path; expected e.g. "
                         "'tpdiff_lightning.models.dit.DiTBlock'")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        return None


def block_classes(paths: Sequence[str] = DEFAULT_BLOCK_CLASSES) -> tuple[type, ...]:
    """The classes named by ``paths`` that import here (a backbone's library may be absent)."""
    return tuple(c for c in map(import_class, paths) if c is not None)


def find_blocks(part: nn.Module, block_classes: Sequence[type]) -> list[nn.Module]:
    """The outermost submodules of ``part`` that are instances of ``block_classes`` (else its ModuleLists' items)."""
    blocks: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if block_classes and isinstance(child, tuple(block_classes)):
                blocks.append(child)
            else:
                visit(child)

    visit(part)
    if not blocks:
        blocks = [b for m in part.modules() if isinstance(m, nn.ModuleList) for b in m.children()]
        # Nested ModuleLists would shard a block and its parent list's item twice: keep the outermost.
        inner = {id(m) for b in blocks for m in list(b.modules())[1:]}
        blocks = [b for b in blocks if id(b) not in inner]
    return blocks


def trainable_parts(module: nn.Module) -> list[nn.Module]:
    """The parts that need gradient synchronisation: ``module.denoiser_modules()`` (backbone, trainable text encoder)."""
    return list(module.denoiser_modules())


def mixed_precision(settings: FSDP2Settings):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    for name in (settings.param_dtype, settings.reduce_dtype):
        if name is not None and name not in DTYPES:
            raise ValueError(f"dtype {name!r} is unknown; expected one of {sorted(DTYPES)} or None")
    param = DTYPES[settings.param_dtype] if settings.param_dtype else None
    reduce = DTYPES[settings.reduce_dtype] if settings.reduce_dtype else None
    return MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce)


def check_all_synchronised(module: nn.Module) -> None:
    """Raise if a trainable parameter was left out of sharding: nothing would average its gradients."""
    left = [n for n, p in module.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
    if left:
        raise ValueError(f"trainable parameters outside the sharded parts would never be synchronised across ranks: "
                         f"{left[:5]}{' …' if len(left) > 5 else ''}; expected every trainable parameter in "
                         "module.denoiser_modules()")


def settings_of(module: nn.Module) -> FSDP2Settings:
    """The settings of the attached ``FSDP2Strategy``, else the defaults."""
    trainer = getattr(module, "_trainer", None)
    strategy = getattr(trainer, "strategy", None)
    return getattr(strategy, "fsdp2", None) or FSDP2Settings()


def context_parallel_of(module: nn.Module) -> ContextParallel | None:
    """The context-parallel group of the attached ``FSDP2Strategy``, or None."""
    trainer = getattr(module, "_trainer", None)
    return getattr(getattr(trainer, "strategy", None), "context_parallel", None)


def apply_fsdp2(module: nn.Module, mesh: DeviceMesh, settings: FSDP2Settings | None = None) -> nn.Module:
    """Shard ``module``'s trained parts with FSDP2 over ``mesh`` (1-D: FSDP; 2-D: HSDP), in place.

    Args:
        module: a TPDiffModule (anything with ``denoiser_modules()`` and an ``ema`` attribute).
        mesh: the device mesh of Lightning's ModelParallelStrategy (or any 1-D/2-D mesh).
        settings: sharding options; default those of the attached ``FSDP2Strategy``, else ``FSDP2Settings()``.
    Returns:
        ``module``, whose trainable parameters (and EMA shadows) are now DTensors.
    """
    from torch.distributed._composable import checkpoint
    from torch.distributed.fsdp import fully_shard

    settings = settings or settings_of(module)
    cp = context_parallel_of(module)
    if cp is not None:
        # The ranks of a context-parallel group hold the same weights and each computes part of every clip's
        # gradient: weights are sharded over every rank (the most memory saved). The reduce-scatter averages over
        # every rank; the module scales its loss by the group's size, so that comes to the sum over each group
        # and the average over the data-parallel replicas (gloo has no pre-scaled sum to divide by them alone).
        mesh = mesh._flatten("data_context_parallel") if mesh.ndim == 2 else mesh
    if mesh.ndim not in (1, 2):
        raise ValueError(f"mesh has {mesh.ndim} dims {mesh.mesh_dim_names}; expected a 1-D (FSDP) or 2-D (HSDP) mesh")
    classes = block_classes((*settings.block_classes, *settings.extra_block_classes))
    kwargs = dict(mesh=mesh, reshard_after_forward=settings.reshard_after_forward, mp_policy=mixed_precision(settings))
    parts = trainable_parts(module)
    if all(any(isinstance(p, DTensor) for p in part.parameters()) for part in parts):
        return module  # configure_model runs again (fit, then test): already sharded, and the EMA must stay
    for part in parts:
        for block in find_blocks(part, classes):
            if settings.activation_checkpointing:
                checkpoint(block)
            fully_shard(block, **kwargs)
        fully_shard(part, **kwargs)
    check_all_synchronised(module)
    if getattr(module, "ema", None) is not None:
        module.ema.reset(module.denoiser_modules())
    return module


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy carrying the FSDP2 options that ``apply_fsdp2`` reads.

    Args:
        block_classes: see ``FSDP2Settings.block_classes`` (default: DiT, Wan, Flux, AnimateDiff, T5/UMT5/CLIP).
        extra_block_classes: class paths added to ``block_classes``.
        activation_checkpointing: recompute each block in backward.
        reshard_after_forward: free gathered weights after forward.
        param_dtype: compute dtype of the gathered weights (``"bfloat16"``), or ``None``.
        reduce_dtype: gradient reduction dtype, or ``None``.
        data_parallel_size: mesh dim 0, replicated across (default: the number of nodes).
        tensor_parallel_size: mesh dim 1, sharded across (default: devices per node).
        save_distributed_checkpoint: one shard per rank in a checkpoint folder (``False``: one full file).
        process_group_backend: ``"nccl"``, ``"gloo"``, or ``None`` for the accelerator's default.
        timeout: collective timeout.
        context_parallel_size: ranks that split one clip's tokens between them (1: none). The mesh becomes
            (world / context_parallel_size, context_parallel_size), the second dim a context-parallel group of
            neighbouring ranks; weights are sharded over every rank. See docs/scale_out.md.
        context_parallel_min_tokens: for a group batch that does not divide evenly over the group, the tokens per
            clip from which a stage splits every clip's tokens (equal shares, attention traffic) rather than the
            clips (some ranks one clip more, no traffic). A batch that divides evenly always splits its clips, one
            smaller than the degree always its tokens.
        context_parallel_attention: how a split sequence attends: ``auto`` (Ulysses where the degree divides the
            heads, Ulysses × ring where they share a factor, ring attention where they share none), ``ulysses``,
            ``ring`` or ``gathered`` (every rank gathers all keys and values).
    """

    def __init__(
        self,
        block_classes: Sequence[str] = DEFAULT_BLOCK_CLASSES,
        extra_block_classes: Sequence[str] = (),
        activation_checkpointing: bool = False,
        reshard_after_forward: bool = True,
        param_dtype: str | None = None,
        reduce_dtype: str | None = None,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: Literal["auto"] | int = "auto",
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = timedelta(minutes=30),
        context_parallel_size: int = 1,
        context_parallel_min_tokens: int = DEFAULT_MIN_TOKENS,
        context_parallel_attention: str = "auto",
    ):
        super().__init__(data_parallel_size, tensor_parallel_size, save_distributed_checkpoint,
                         process_group_backend, timeout)
        if not (isinstance(context_parallel_size, int) and context_parallel_size >= 1):
            raise ValueError(f"trainer.strategy.init_args.context_parallel_size={context_parallel_size!r} is invalid; "
                             "expected an integer >= 1 (1: no context parallelism)")
        if context_parallel_size > 1 and (data_parallel_size, tensor_parallel_size) != ("auto", "auto"):
            raise ValueError(f"trainer.strategy.init_args.context_parallel_size={context_parallel_size} sets the "
                             "mesh to (world / context_parallel_size, context_parallel_size); expected "
                             "data_parallel_size and tensor_parallel_size left at auto")
        if not (isinstance(context_parallel_min_tokens, int) and context_parallel_min_tokens >= 0):
            raise ValueError(f"trainer.strategy.init_args.context_parallel_min_tokens={context_parallel_min_tokens!r} "
                             "is invalid; expected an integer >= 0 (0: split the tokens of every batch that does not divide evenly)")
        if context_parallel_attention not in ATTENTION_MODES:
            raise ValueError(f"trainer.strategy.init_args.context_parallel_attention={context_parallel_attention!r} "
                             f"is invalid; expected one of {', '.join(ATTENTION_MODES)}")
        self.context_parallel_size = context_parallel_size
        self.context_parallel_attention = context_parallel_attention
        self.context_parallel_min_tokens = context_parallel_min_tokens
        self.context_parallel: ContextParallel | None = None
        self.fsdp2 = FSDP2Settings(tuple(block_classes), activation_checkpointing, reshard_after_forward,
                                   param_dtype, reduce_dtype, tuple(extra_block_classes))
        mixed_precision(self.fsdp2)  # check the dtype names now, not after the processes started

    def setup_environment(self) -> None:
        cp = self.context_parallel_size
        if cp > 1:  # the mesh is (data parallel, context parallel): each group's ranks are neighbours (one node)
            world = self.num_nodes * self.num_processes
            if world % cp:
                raise ValueError(f"trainer.strategy.init_args.context_parallel_size={cp} does not divide the "
                                 f"{world} processes; expected a divisor of the world size")
            self._data_parallel_size, self._tensor_parallel_size = world // cp, cp
        super().setup_environment()
        if cp > 1:
            group_mesh = self.device_mesh["tensor_parallel"]
            groups = [list(range(g * cp, (g + 1) * cp)) for g in range(world // cp)]  # the mesh's rows
            subgroups = build_subgroups(groups, self.global_rank, self.context_parallel_min_tokens)
            self.context_parallel = ContextParallel(group_mesh.get_group(), cp, group_mesh.get_local_rank(),
                                                    self.context_parallel_min_tokens, self.context_parallel_attention,
                                                    subgroups)

    @property
    def data_parallel_rank(self) -> int:
        """This rank's data-parallel replica: the ranks of a context-parallel group read the same clips."""
        return self.global_rank // self.context_parallel_size

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.context_parallel_size

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Every data-parallel replica reads its own items (both mesh dims shard or replicate weights; under context
        parallelism the ranks of a group share their items), so map-style loaders such as predict's split their
        items over the replicas. Lightning's ModelParallelStrategy assumes tensor parallelism on dim 1."""
        return {"num_replicas": self.data_parallel_size, "rank": self.data_parallel_rank}
