"""TPDiffModule: the LightningModule that trains, validates and samples a backbone with the temporal pyramid."""

from __future__ import annotations

import inspect
import json
import warnings
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tpdiff_lightning.data.frame_size import frame_size
from tpdiff_lightning.data.latent_cache import check_codec, check_text_encoder, pad_text
from tpdiff_lightning.data.ranks import data_parallel
from tpdiff_lightning.distributed.context_parallel import ContextParallel, split_forward
from tpdiff_lightning.method.alignment import align_noise
from tpdiff_lightning.method.pyramid import Stage, TemporalPyramid, randn
from tpdiff_lightning.method.sampling import check_step_weights, guided_one_pass, sample
from tpdiff_lightning.method.schedules import make_schedule
from tpdiff_lightning.models.codec import IdentityCodec
from tpdiff_lightning.models.dit import VideoDiT
from tpdiff_lightning.models.token_split import token_count
from tpdiff_lightning.models.text_encoder import T5TextEncoder, check_token_embedding
from tpdiff_lightning.training.ema import EMA
from tpdiff_lightning.training.finite_input import check_finite_input, finite_rows
from tpdiff_lightning.training.fit_checks import check_fit_setup
from tpdiff_lightning.training.flat_settings import grouped, is_flat
from tpdiff_lightning.training.gradient_clipping import clip_gradients
from tpdiff_lightning.training.optimizer import apply_optimizer_settings, make_adamw
from tpdiff_lightning.training.settings import (
    GROUPS,
    PREFIX,
    ClipSettings,
    ModuleSettings,
    ObjectiveSettings,
    OptimizationSettings,
    PyramidSettings,
    SamplingSettings,
    as_settings,
    qualify,
    sequence,
)

BackboneFactory = Callable[[int, int], nn.Module]


def to_uint8_video(video: Tensor) -> Tensor:
    """``(B, 3, F, H, W)`` in [-1, 1] to uint8 ``(B, F, H, W, 3)``."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)


class TPDiffModule(L.LightningModule):
    """Trains one backbone over every stage of a temporal pyramid (TPDiff), or over one stage (vanilla).

    Args:
        backbone: factory ``(in_channels, text_dim) -> nn.Module`` taking ``(x, t, text, text_mask, stride)``;
            default the built-in ``VideoDiT`` at size ``dit-tiny``.
        text_encoder: ``captions -> (emb, mask)`` module with ``.dim``; default a small byte-level T5.
        codec: video to latent codec with ``encode``/``decode``/``latent_channels``; default identity (pixels).
        clip: the clip shape, linked from the data by the CLI (``tpdiff_lightning.training.settings``).
        pyramid: stages, frame-rate and spatial reductions, partition, stage weights, the anchored first frame.
        objective: schedule, target, alignment, caption dropout and the stage draw.
        optimization: AdamW, warmup and the weight EMA.
        sampling: steps and their split, guidance, renoise, timestep shift, frames and batch size.

    Each group takes its dataclass or a dict of its fields (as stored in a checkpoint); a checkpoint of the release
    with flat settings loads through :meth:`load_from_checkpoint` and the CLI
    (``tpdiff_lightning.training.flat_settings``).
    """

    def __init__(
        self,
        backbone: BackboneFactory | None = None,
        text_encoder: nn.Module | None = None,
        codec: nn.Module | None = None,
        clip: ClipSettings = ClipSettings(),
        pyramid: PyramidSettings = PyramidSettings(),
        objective: ObjectiveSettings = ObjectiveSettings(),
        optimization: OptimizationSettings = OptimizationSettings(),
        sampling: SamplingSettings = SamplingSettings(),
    ):
        super().__init__()
        settings = ModuleSettings(*(as_settings(GROUPS[name], value) for name, value in
                                    (("clip", clip), ("pyramid", pyramid), ("objective", objective),
                                     ("optimization", optimization), ("sampling", sampling))))
        self.save_hyperparameters()
        self.hparams.update(settings.as_dict())  # plain dicts in the checkpoint: it loads with weights_only=True
        self.settings = settings
        self.codec = codec if codec is not None else IdentityCodec()
        try:
            self.pyramid = self.build_pyramid(settings)
        except ValueError as error:
            raise ValueError(qualify(str(error))) from error
        self.text_encoder = text_encoder if text_encoder is not None else T5TextEncoder()
        backbone = backbone if backbone is not None else VideoDiT
        self.backbone = backbone(self.codec.latent_channels, self.text_encoder.dim)
        if self.pyramid.spatial:
            self.check_spatial_pyramid()
        decay = settings.optimization.ema_decay
        self.ema = EMA(self.denoiser_modules(), decay) if decay is not None else None

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args: Any, **kwargs: Any) -> "TPDiffModule":
        """Lightning's ``load_from_checkpoint``, for a checkpoint of the flat-settings release too: its settings are
        read into the groups (keyword arguments still win)."""
        hparams = torch.load(checkpoint_path, map_location="cpu", weights_only=False, mmap=True).get(
            "hyper_parameters") or {}
        if is_flat(hparams):
            stored = grouped(hparams)
            kwargs = {**{name: stored[name] for name in GROUPS if name in stored},
                      "_class_path": stored.get("_class_path", f"{cls.__module__}.{cls.__qualname__}"), **kwargs}
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def build_pyramid(self, settings: ModuleSettings) -> TemporalPyramid:
        """The pyramid over the clip's latent frames, with the checks that need more than one group."""
        clip, shape, objective, sampling = settings.clip, settings.pyramid, settings.objective, settings.sampling
        self.frame_size = frame_size(clip.resolution)
        if sampling.timestep_shift != 1 and objective.schedule != "flow":
            raise ValueError(f"{PREFIX}sampling.timestep_shift={sampling.timestep_shift!r} is set for "
                             f"{PREFIX}objective.schedule={objective.schedule!r}; expected 1 (the shift applies to "
                             "flow sampling only)")
        latent_frames = self.latent_frames(clip.num_frames)
        try:
            pyramid = TemporalPyramid(make_schedule(objective.schedule, objective.beta_schedule), latent_frames,
                                      shape.num_stages, sequence(shape.reductions), sequence(shape.partition),
                                      shape.anchor_first_frame, sequence(shape.stage_weights), objective.flow_velocity,
                                      sequence(shape.spatial_reductions))
        except ValueError as error:
            if latent_frames == clip.num_frames:
                text = str(error)  # the pyramid's frame count is the clip's: name it as the user sets it
                raise ValueError(f"{PREFIX}clip.{text}" if text.startswith("num_frames=") else text) from error
            raise ValueError(f"{PREFIX}clip.num_frames={clip.num_frames} video frames are {latent_frames} latent "
                             f"frames under the codec, which the pyramid cannot take: {qualify(str(error))}. Causal "
                             f"video VAEs (1 + 4k frames) need {PREFIX}pyramid.anchor_first_frame: true") from error
        check_step_weights(sampling.step_weights, pyramid.num_stages)
        if sampling.steps < pyramid.num_stages:
            raise ValueError(f"{PREFIX}sampling.steps={sampling.steps} is invalid; expected an integer of at least one "
                             f"step per stage, >= {pyramid.num_stages} ({PREFIX}pyramid.num_stages)")
        return pyramid

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames of a ``num_frames``-frame clip under the codec (``(F - 1) / 4 + 1`` for Wan's VAE)."""
        if hasattr(self.codec, "latent_frames"):
            return self.codec.latent_frames(num_frames)
        compression = getattr(self.codec, "temporal_compression", 1)
        if num_frames % compression:
            raise ValueError(f"num_frames={num_frames} is not a multiple of the codec's temporal compression "
                             f"{compression}")
        return num_frames // compression

    def latent_size(self) -> tuple[int, int]:
        """Latent height and width: the frame size over the codec's spatial compression."""
        c = getattr(self.codec, "spatial_compression", 1)
        H, W = self.frame_size
        if H % c or W % c:
            raise ValueError(f"resolution {H}x{W} is not divisible by the codec's spatial compression {c}")
        return H // c, W // c

    def check_spatial_pyramid(self) -> None:
        """A spatio-temporal pyramid needs a latent size every stage divides into whole patches, and a backbone
        told the spatial stride; otherwise one clear error naming ``spatial_reductions``."""
        q = list(self.pyramid.spatial_reductions)
        forward = inspect.signature(self.backbone.forward).parameters
        if "spatial_stride" not in forward:
            raise ValueError(f"{PREFIX}pyramid.spatial_reductions={q} needs a backbone whose forward takes spatial_stride; "
                             f"{type(self.backbone).__name__} does not (expected all 1, or VideoDiT, Wan, Flux, "
                             "AnimateDiff)")
        H, W = self.latent_size()
        P = self.pyramid.stages[0].spatial_stride
        patch = getattr(self.backbone, "patch_size", 1)  # a UNet has none: any size
        p_h, p_w = tuple(patch)[-2:] if isinstance(patch, (tuple, list)) else (patch, patch)  # Wan: (p_t, p_h, p_w)
        if H % (P * p_h) or W % (P * p_w):
            raise ValueError(f"{PREFIX}pyramid.spatial_reductions={q} shrinks the {H}x{W} latents by {P} at stage 0; expected height "
                             f"divisible by {P * p_h} and width by {P * p_w} (spatial stride {P} x backbone "
                             f"patch_size {patch})")

    def stage_strides(self, stage: Stage) -> dict[str, int]:
        """The backbone's position keywords for a stage: ``stride``, and ``spatial_stride`` where it is above 1."""
        if stage.spatial_stride == 1:
            return {"stride": stage.stride}
        return {"stride": stage.stride, "spatial_stride": stage.spatial_stride}

    def configure_model(self) -> None:
        # Under Lightning's ModelParallelStrategy (FSDP2) the strategy hands us a device mesh to shard over.
        mesh = self.device_mesh if self._trainer is not None else None
        if mesh is not None:
            from tpdiff_lightning.distributed.fsdp2 import apply_fsdp2

            apply_fsdp2(self, mesh)

    def denoiser_modules(self) -> nn.ModuleList:
        """The trained parts: the backbone and the text encoder (when it is trainable)."""
        parts = [self.backbone]
        if any(p.requires_grad for p in self.text_encoder.parameters()):
            parts.append(self.text_encoder)
        return nn.ModuleList(parts)

    @contextmanager
    def ema_weights(self, use_ema: bool = True) -> Iterator[None]:
        """Within the block, the trained parts hold the EMA weights (when there is an EMA and ``use_ema``)."""
        if not (use_ema and self.ema is not None):
            yield
            return
        with self.ema.applied(self.denoiser_modules()):
            yield

    def model_time(self, t: Tensor) -> Tensor:
        """Global time in [0, 1] to the timestep the backbone is told (``t*1000`` flow, ``t*999`` ddim)."""
        return t * self.pyramid.schedule.timestep_scale

    def drop_captions(self, captions: Sequence[str], generator: torch.Generator | None = None) -> list[str]:
        """Replace each caption by the empty one with probability ``caption_dropout``."""
        p = self.settings.objective.caption_dropout
        if p == 0:
            return list(captions)
        keep = torch.rand(len(captions), generator=generator) >= p
        return [c if k else "" for c, k in zip(captions, keep.tolist())]

    def stage_generator(self, step: int) -> torch.Generator:
        """A generator seeded by the step (and, without ``stage_sync``, the rank), so a resumed run draws the
        same stages again and synchronised ranks draw the same stage at the same step."""
        seed = self.settings.objective.stage_seed * 1_000_003 + step
        if not self.settings.objective.stage_sync:
            seed = self.noise_seed(step, self.data_parallel_rank()) + 1
        return torch.Generator().manual_seed(seed)

    def noise_seed(self, step: int, rank: int) -> int:
        """Seed of the noise, positions and caption dropout of one rank's micro-batch: distinct per rank,
        and the same again when a resumed run reaches the same step."""
        return int(np.random.SeedSequence([self.settings.objective.stage_seed, step, rank]).generate_state(1, np.uint64)[0] >> 1)

    def micro_step(self, batch_idx: int) -> int:
        """Counts micro-batches, so each one of a gradient-accumulation window draws its own stage."""
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        return self.global_step * accumulate + batch_idx % accumulate

    def batch_stage(self, batch: dict[str, Any], batch_idx: int) -> int:
        """The stage micro-batch ``batch_idx`` trains: a token-budget batch was assembled for the stage drawn for
        its step (``data.token_batches``); any other is drawn from the step here."""
        if "stage" in batch:
            return int(batch["stage"])
        return self.pyramid.sample_stage(self.stage_generator(self.micro_step(batch_idx)))

    def batch_plan(self, buckets: Sequence[Any], budget: int | None, stage_aware: bool,
                   clips: int | None = None) -> Any:
        """The data's plan of bucketed or token-budget batches for this model (``training.batch_plan``)."""
        from tpdiff_lightning.training.batch_plan import batch_plan

        return batch_plan(self, buckets, budget, stage_aware, clips)

    def pyramid_for(self, latent_frames: int) -> TemporalPyramid:
        """The pyramid over clips of ``latent_frames`` latent frames (a bucket's length; the configured one is
        ``self.pyramid``)."""
        if latent_frames == self.pyramid.num_frames:
            return self.pyramid
        cache = self.__dict__.setdefault("_pyramids", {})
        if latent_frames not in cache:
            cache[latent_frames] = self.pyramid.with_num_frames(latent_frames)
        return cache[latent_frames]

    def stage_loss(self, x0: Tensor, text: Tensor, text_mask: Tensor, i: int,
                   generator: torch.Generator | None = None) -> Tensor:
        """Mean squared error of the backbone against stage i's target (paper Algorithm 2), for clips of any
        length the pyramid takes (``pyramid_for``)."""
        pyramid = self.pyramid_for(x0.shape[2])
        stage = pyramid.stages[i]
        noise = randn(pyramid.stage_shape(x0, i), generator, x0.device, x0.dtype)  # (B, C, F_i, H/P_i, W/P_i)
        if self.settings.objective.alignment:
            data = pyramid.downsample(x0, stage.stride, stage.spatial_stride)  # at the stage's shape
            if self.settings.objective.alignment_scope == "global" and self.training:
                from tpdiff_lightning.method.global_alignment import align_noise_global

                noise = align_noise_global(data, noise, self.data_parallel_group())
            else:
                noise = align_noise(data, noise)
        draw_device = generator.device if generator is not None else x0.device
        # (B,) position in the stage, kept in float32 so half-precision data does not round the time.
        u = torch.rand(x0.shape[0], generator=generator, device=draw_device).to(x0.device)
        x_t, t, target = pyramid.interpolate(x0, noise, i, u)
        pred = self.run_backbone(self.backbone, x_t, self.model_time(t), text, text_mask, stage)  # stage's shape
        return F.mse_loss(pred.float(), target.float())

    def run_backbone(self, backbone: nn.Module, x: Tensor, t: Tensor, text: Tensor, text_mask: Tensor,
                     stage: Stage) -> Tensor:
        """``backbone(x, t, text, text_mask, strides)`` on the stage's shape, under context parallelism where the
        strategy has a group: the group splits the batch's clips or every clip's tokens between its ranks
        (``ContextParallel.splits_sequence``: the clips where they divide evenly or the stage is short). Either way
        every rank of the group ends with the whole prediction (and the same loss), its gradient flowing into its
        own share."""
        cp = self.context_parallel
        if cp is None:
            return backbone(x, t, text, text_mask, **self.stage_strides(stage))
        return split_forward(backbone, cp, token_count(backbone, x.shape[2:]), x, t, text, text_mask,
                             **self.stage_strides(stage))

    def data_parallel_rank(self) -> int:
        """This process's data-parallel replica (the ranks of a context-parallel group are one replica)."""
        return data_parallel(self._trainer)[0] if self._trainer is not None else 0

    @property
    def context_parallel(self) -> ContextParallel | None:
        """The strategy's context-parallel group (``FSDP2Strategy(context_parallel_size=...)``), or None."""
        trainer = self._trainer
        return getattr(trainer.strategy, "context_parallel", None) if trainer is not None else None

    def data_parallel_group(self):
        """The process group of the data-parallel replicas that hold this rank's place in their context-parallel
        groups (global alignment pairs their clips); None (every rank) without context parallelism."""
        trainer = self._trainer
        mesh = getattr(trainer.strategy, "device_mesh", None) if self.context_parallel is not None else None
        return mesh["data_parallel"].get_group() if mesh is not None else None

    @torch.no_grad()
    def encode_video(self, video: Tensor) -> Tensor:
        """Pixels ``(B, 3, F, H, W)`` in [-1, 1] to latents ``(B, C, F', H', W')``."""
        return self.codec.encode(video)

    def batch_latents(self, batch: dict[str, Any]) -> Tensor:
        """The batch's clean latents: pre-encoded ones from latent shards (after a codec check), or encoded now."""
        if "latent" not in batch:
            x0 = self.encode_video(batch["video"])
        else:
            check_codec(json.loads(batch["codec"]), self.codec)
            x0 = batch["latent"].to(self.dtype)
        if "bucket" in batch:  # a bucketed batch: its shape was checked against the pyramid with the buckets
            return x0
        if tuple(x0.shape[3:]) != self.latent_size():
            raise ValueError(f"the batch has latents of size {tuple(x0.shape[3:])}; the model expects "
                             f"{self.latent_size()} (resolution {self.frame_size} through the codec)")
        if x0.shape[2] != self.pyramid.num_frames:
            raise ValueError(f"the batch has {x0.shape[2]} latent frames; the pyramid expects "
                             f"{self.pyramid.num_frames} (clip.num_frames={self.settings.clip.num_frames} through the codec "
                             f"{getattr(self.codec, 'name', type(self.codec).__name__)!r})")
        return x0

    def batch_text(self, batch: dict[str, Any], captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Caption tokens and mask: cached embeddings when the shards hold them and the encoder is frozen."""
        frozen = not any(p.requires_grad for p in self.text_encoder.parameters())
        if "text_emb" in batch and frozen:
            if "text_encoder" in batch:
                check_text_encoder(json.loads(batch["text_encoder"]), self.text_encoder)
            rows = [{"text_emb": e[m], "text_mask": m[m]} for e, m in zip(batch["text_emb"], batch["text_mask"].bool())]
            dropped = [c == "" and o != "" for c, o in zip(captions, batch["caption"])]
            if any(dropped):  # caption dropout still works: the empty caption's embedding replaces those rows
                empty, empty_mask = self.text_encoder([""])
                for b in (b for b, d in enumerate(dropped) if d):
                    rows[b] = {"text_emb": empty[0][empty_mask[0]].to(rows[b]["text_emb"]),
                               "text_mask": empty_mask[0][empty_mask[0]].to(rows[b]["text_mask"].device)}
            emb, mask = pad_text(rows)  # (B, L, D), (B, L)
            return emb.to(self.device, self.dtype), mask.to(self.device)
        return self.text_encoder(list(captions))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x0 = self.batch_latents(batch)  # (B, C, F, H, W)
        step = self.micro_step(batch_idx)
        seed = self.noise_seed(step, self.data_parallel_rank())  # a context-parallel group draws the same noise
        captions = self.drop_captions(batch["caption"], torch.Generator().manual_seed(seed))
        text, text_mask = self.batch_text(batch, captions)  # (B, L, D)
        i = self.batch_stage(batch, batch_idx)
        finite = finite_rows(x0).all()  # read from the device together with the loss: one host sync, not two
        try:
            loss = self.stage_loss(x0, text, text_mask, i, torch.Generator(x0.device).manual_seed(seed))
        except ValueError:  # e.g. alignment refusing a non-finite cost: when the input is to blame, name its samples
            check_finite_input(x0, batch.get("key"), self.global_step, i)
            raise
        input_ok, loss_ok = torch.stack([finite, torch.isfinite(loss.detach())]).tolist()
        if not input_ok:
            check_finite_input(x0, batch.get("key"), self.global_step, i)
        if not loss_ok:
            raise FloatingPointError(
                f"training loss is {loss.item()} at global_step={self.global_step} in stage {i} "
                f"({self.pyramid_for(x0.shape[2]).stages[i].num_frames} frames); expected a finite value. "
                "Lower the learning rate or check the data.")
        B = x0.shape[0]
        cp = self.context_parallel
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        self.log(f"train/loss_stage{i}", loss, batch_size=B)
        self.log("train/stage", float(i), batch_size=B)
        if "tokens" in batch:  # token-budget batches: how full each step is
            self.log("data/tokens_per_step", float(batch["tokens"]), batch_size=B)
            self.log("data/clips_per_step", float(B), batch_size=B)
            self.log("data/bucket_index", float(batch["bucket_index"]), batch_size=B)
        # Under context parallelism every rank of a group holds the same loss and backpropagates its own share of
        # the clip; FSDP averages the gradients over all ranks, so the group's size brings that to the group's sum.
        return loss * cp.size if cp is not None else loss

    def alignment_warning(self, batch_size: int, world_size: int) -> str | None:
        """Why alignment cannot act, or ``None``: it needs at least 2 clips in one assignment (local: the
        per-device micro-batch; global: the micro-batches of all ranks together)."""
        if not self.settings.objective.alignment:
            return None
        scope = self.settings.objective.alignment_scope
        clips = batch_size * world_size if scope == "global" else batch_size
        if clips >= 2:
            return None
        where = (f"{batch_size} clip per device" if scope == "local"
                 else f"a global batch of {clips} clip ({batch_size} per device x {world_size} devices)")
        hint = ("set alignment_scope: global to pair the clips of all ranks" if scope == "local" and world_size > 1
                else "raise the batch size")
        return (f"alignment is on but acts on {clips} clip (alignment_scope={scope!r}, {where}), so it pairs "
                f"nothing; {hint}, or set alignment: false")

    def on_fit_start(self) -> None:
        # The datamodule's batch size is known before the first step; otherwise the first batch tells.
        batch_size = getattr(self.trainer.datamodule, "batch_size", None)
        self._alignment_checked = isinstance(batch_size, int)
        if self._alignment_checked:
            self.warn_if_alignment_idle(batch_size)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if not getattr(self, "_alignment_checked", True) and isinstance(batch, dict) and "caption" in batch:
            self._alignment_checked = True
            self.warn_if_alignment_idle(len(batch["caption"]))

    def warn_if_alignment_idle(self, batch_size: int) -> None:
        message = self.alignment_warning(batch_size, data_parallel(self.trainer)[1])
        if message is not None and self.global_rank == 0:
            warnings.warn(message, UserWarning, stacklevel=2)

    def load_weights(self, path: str) -> None:
        """Load a checkpoint's trained weights (and EMA, where both have one) into this module, nothing else: the
        start of a new run from a trained model (``--weights_from``)."""
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        self.on_load_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        if self.ema is None:
            state = {k: v for k, v in state.items() if not k.startswith("ema.")}
        result = self.load_state_dict(state, strict=False)
        wrong = [k for k in [*result.missing_keys, *result.unexpected_keys] if not k.startswith("ema.")]
        if wrong:
            raise ValueError(f"weights_from={path} does not hold this network's weights: {wrong[:3]} "
                             f"({len(wrong)} keys differ)")
        if self.ema is not None and any(k.startswith("ema.") for k in result.missing_keys):
            self.ema.reset(self.denoiser_modules())  # a checkpoint without an EMA: it starts from the weights

    def on_train_start(self) -> None:
        # After a resume the optimizer and schedule come back as they were saved; the config's optimization settings
        # (which the CLI said it applies) replace theirs from here on. Without a resume this changes nothing.
        settings = [{k: v for k, v in group.items() if k != "params"} for group in self.param_groups()]
        schedulers = self.trainer.lr_scheduler_configs
        apply_optimizer_settings(self.trainer.optimizers[0], schedulers[0].scheduler if schedulers else None, settings)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.global_step_at_load = int(checkpoint.get("global_step", -1))
        state = checkpoint.get("state_dict")
        check_token_embedding(state, self.state_dict(), "text_encoder.")
        if state is not None and any(k.startswith("ema.shadow.") for k in state):
            current = self.state_dict()
            for key in [k for k in state if k.startswith("ema.shadow.")]:  # checkpoints from the full-copy EMA
                name = "ema." + key[len("ema.shadow."):].replace(".", "__")
                value = state.pop(key)
                if name in current:
                    state[name] = value

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # The EMA follows each optimizer step here, before any callback (such as ModelCheckpoint) sees the step.
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.denoiser_modules())

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "validate" and getattr(self, "global_step_at_load", -1) >= 0:
            # A `validate` on a checkpoint logs where the training run logged that checkpoint's own validation
            # (its last step, global_step - 1), in its own TensorBoard sub-run: beside the run's curve, not at 0.
            self.trainer.fit_loop.epoch_loop._batches_that_stepped = max(0, self.global_step_at_load - 1)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x0 = self.batch_latents(batch)
        text, text_mask = self.batch_text(batch, batch["caption"])
        B = x0.shape[0]
        losses = []
        for i in range(self.pyramid.num_stages):
            # Fixed seeds: the same noise and positions at every validation, so curves compare.
            g = torch.Generator().manual_seed(10_000 * batch_idx + i)
            loss = self.stage_loss(x0, text, text_mask, i, g)
            losses.append(loss)
            self.log(f"val/loss_stage{i}", loss, batch_size=B, sync_dist=True)
        self.log("val/loss", torch.stack(losses).mean(), prog_bar=True, batch_size=B, sync_dist=True)

    @torch.no_grad()
    def generate(self, captions: Sequence[str], seeds: Sequence[int], num_frames: int | None = None,
                 num_steps: int | None = None, guidance_scale: float | None = None, use_ema: bool = True,
                 renoise: bool | None = None, batch_size: int | None = None,
                 step_weights: Sequence[float] | None = None) -> Tensor:
        """Sample one clip per caption with its own seed; returns pixels ``(B, 3, F, H, W)`` in [-1, 1].

        Each argument left at None takes the module's ``sampling`` setting of that name (``num_steps``: its
        ``steps``). ``num_frames`` counts video frames (default ``sampling.num_frames``, else the clip's). Captions
        are sampled ``batch_size`` at a time, each with a generator of its own seed, so a clip does not depend on
        the batch it is in; with guidance the conditional and unconditional halves run as one batch."""
        hp = self.settings.sampling
        num_frames = self.latent_frames(num_frames or hp.num_frames or self.settings.clip.num_frames)
        pyramid = self.pyramid if num_frames == self.pyramid.num_frames else self.pyramid.with_num_frames(num_frames)
        scale = hp.guidance_scale if guidance_scale is None else guidance_scale
        renoise = hp.renoise if renoise is None else renoise
        chunk = batch_size or hp.batch_size
        backbone, text_encoder = self.backbone, self.text_encoder
        # The sampler's state: float32 under half precision (the denoiser casts), float64 for a float64 module.
        state_dtype = torch.promote_types(next(backbone.parameters()).dtype, torch.float32)
        H, W = self.latent_size()
        clips = []
        was_training = self.training
        self.eval()
        try:
            # Sampling from a callback runs outside Lightning's autocast; enter the run's precision context here.
            precision = self.trainer.precision_plugin.forward_context() if self._trainer is not None else nullcontext()
            with self.ema_weights(use_ema), precision:
                for start in range(0, len(captions), chunk):
                    batch = [str(c) for c in captions[start:start + chunk]]
                    B = len(batch)
                    if scale != 1.0:  # rows 0..B-1 conditional, B..2B-1 unconditional
                        text, mask = text_encoder(batch + [""] * B)  # (2B, L, D)
                        model = guided_one_pass(self.denoiser(backbone, text, mask), scale)
                    else:
                        text, mask = text_encoder(batch)  # (B, L, D)
                        model = self.denoiser(backbone, text, mask)
                    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds[start:start + chunk]]
                    latents = sample(model, pyramid, B, (self.codec.latent_channels, H, W),
                                     num_steps or hp.steps, generators, renoise, device=self.device,
                                     dtype=state_dtype,
                                     timestep_shift=hp.timestep_shift,
                                     step_weights=sequence(step_weights if step_weights is not None else hp.step_weights))
                    clips.append(self.codec.decode(latents))
        finally:
            self.train(was_training)
        return torch.cat(clips).clamp(-1, 1)

    def denoiser(self, backbone: nn.Module, text: Tensor, text_mask: Tensor) -> Callable[[Tensor, Tensor, Stage], Tensor]:
        """Close over the captions: the sampler's ``(x, t, stage) -> prediction``."""
        # The sampler's state stays float32; a backbone held in another dtype (bf16-true precision, a bf16 base
        # under LoRA) gets it cast to its weights' dtype here, and answers back in float32. The time is not cast:
        # each backbone embeds it in float32 (bf16 would round t*1000 to 3 digits).
        dtype = next((p.dtype for p in backbone.parameters() if p.is_floating_point()), torch.float32)

        def model(x: Tensor, t: Tensor, stage: Stage) -> Tensor:
            B = x.shape[0]
            out = self.run_backbone(backbone, x.to(dtype), self.model_time(t), text.expand(B, -1, -1).to(dtype),
                                    text_mask.expand(B, -1), stage)
            return out.to(x.dtype)
        return model

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        captions = list(batch["caption"])
        seeds = [int(s) for s in batch["seed"]]
        indices = [int(i) for i in batch.get("index", range(len(captions)))]
        video = self.generate(captions, seeds)  # placeholders too: every rank runs the same forward passes
        keep = [i for i, index in enumerate(indices) if index >= 0]  # index -1: padding to the world size
        return {"video": to_uint8_video(video[keep]).cpu(), "caption": [captions[i] for i in keep],
                "seed": [seeds[i] for i in keep], "index": [indices[i] for i in keep]}

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: the denoiser's, then a trainable text encoder's (at
        ``lr * text_lr_scale``); only the groups that hold parameters."""
        hp = self.settings.optimization
        text_ids = {id(p) for p in self.text_encoder.parameters()}
        params = [p for p in self.denoiser_modules().parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if id(p) not in text_ids], "lr": hp.lr},
                  {"params": [p for p in params if id(p) in text_ids], "lr": hp.lr * hp.text_lr_scale}]
        return [dict(g, weight_decay=hp.weight_decay, betas=tuple(hp.betas)) for g in groups if g["params"]]

    def configure_optimizers(self):
        hp = self.settings.optimization
        groups = self.param_groups()
        trainer = self._trainer
        optimizer = make_adamw(groups, hp.lr, hp.weight_decay, hp.betas, hp.fused_optimizer,
                               precision=str(trainer.precision) if trainer is not None else "32-true",
                               strategy=type(trainer.strategy).__name__ if trainer is not None else "")
        warmup = max(1, hp.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def setup(self, stage: str) -> None:
        if str(getattr(stage, "value", stage)) == "fit" and self._trainer is not None:
            check_fit_setup(self.trainer, self)  # the CLI checks earlier, before it writes anything

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Chosen with the optimizer, precision and strategy in view (tpdiff_lightning/training/gradient_clipping.py):
        # Lightning's own path refuses the fused AdamW under bf16 and clipping by norm under FSDP(1).
        clip_gradients(self.trainer, optimizer, gradient_clip_val, gradient_clip_algorithm)
