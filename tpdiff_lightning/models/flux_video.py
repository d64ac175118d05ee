"""A frames-as-tokens Flux transformer as a TPDiff backbone (the paper's MiniFlux-vid analogue), flow matching.

Notation: B batch, C latent channels, F frames of the current stage, H, W latent height and width,
h = H/2, w = W/2, N = F·h·w image tokens, L text tokens, D text width, S the stage's temporal stride.

The network is diffusers' ``FluxTransformer2DModel`` unchanged. Each frame is packed 2×2 exactly as the Flux
pipeline packs an image (channels ordered ``(C, 2, 2)``, so the model's ``in_channels`` is ``4·C``), and the
frames' tokens are concatenated: one sequence of N tokens with full attention across space and time. The
rotary position ids are ``[j·S, row, col]``: Flux's first rope axis, which is 0 for images, carries the frame's
position on the full-rate timeline (SPEC Eq. 14); text ids are zeros as in the pipeline.

Conventions checked against this project:
- Time: the module passes ``t·1000`` (flow); Flux multiplies its ``timestep`` by 1000 internally, so it is
  given ``t`` in [0, 1] (the same thing its pipeline does with ``sigma``).
- Velocity: Flux is trained on ``noise − data`` (diffusers' Flux training scripts), and our flow target
  ``x_start − x_end`` (``TemporalPyramid.interpolate``) is the derivative towards noise too (``ε − x0`` for a
  single stage), so the prediction is returned without a sign change.
- Pooled text: Flux wants a pooled vector (CLIP's, in the original) in ``time_text_embed``. Here it is the
  masked mean of the text tokens; when ``pooled_projection_dim`` differs from ``text_dim`` a trainable linear
  map (zero-initialised, so a pretrained model starts from a neutral pooled input) takes it to that width.
  That map is not part of the loaded model, so it stays trainable under LoRA.
- Text mask: padded text tokens are masked out as attention keys (in the joint attention of every block);
  without padding no mask is passed, so the attention kernel is the unmasked one.

FSDP: wrap ``FluxTransformerBlock`` and ``FluxSingleTransformerBlock`` from
``diffusers.models.transformers.transformer_flux`` (both in ``tpdiff_lightning.distributed.fsdp2.DEFAULT_BLOCK_CLASSES``).
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections
from torch import Tensor, nn

from tpdiff_lightning.models.lora import LoraSettings, prepare_training
from tpdiff_lightning.models.token_split import TokenSplit, TokenSplitFactory
from tpdiff_lightning.models.weights_folder import config_class_name, resolve_part_folder

PACK = 2
"""Spatial packing factor of Flux latents (2×2 latent pixels per token)."""


def pack_frames(x: Tensor) -> Tensor:
    """Pack each frame of ``x (B, C, F, H, W)`` 2×2 into tokens ``(B, F·h·w, C·4)``, frame-major."""
    B, C, F, H, W = x.shape
    x = x.view(B, C, F, H // PACK, PACK, W // PACK, PACK)  # (B, C, F, h, 2, w, 2)
    x = x.permute(0, 2, 3, 5, 1, 4, 6)  # (B, F, h, w, C, 2, 2)
    return x.reshape(B, F * (H // PACK) * (W // PACK), C * PACK * PACK)  # (B, N, C·4)


def unpack_frames(tokens: Tensor, F: int, H: int, W: int) -> Tensor:
    """Inverse of ``pack_frames``: tokens ``(B, F·h·w, C·4)`` back to ``(B, C, F, H, W)``."""
    B, _, CP = tokens.shape
    C, h, w = CP // (PACK * PACK), H // PACK, W // PACK
    x = tokens.view(B, F, h, w, C, PACK, PACK)  # (B, F, h, w, C, 2, 2)
    x = x.permute(0, 4, 1, 2, 5, 3, 6)  # (B, C, F, h, 2, w, 2)
    return x.reshape(B, C, F, H, W)  # (B, C, F, H, W)


def image_ids(num_frames: int, h: int, w: int, stride: int = 1, device: torch.device | None = None,
              spatial_stride: int = 1) -> Tensor:
    """Rotary ids ``(F·h·w, 3)`` = ``[j·S, row·P, col·P]`` of the tokens of ``pack_frames`` (frame-major), float32;
    ``P`` is the stage's spatial stride (1 outside a spatio-temporal pyramid)."""
    if num_frames < 1 or stride < 1 or spatial_stride < 1:
        raise ValueError(f"expected num_frames >= 1, stride >= 1 and spatial_stride >= 1, got num_frames={num_frames}, "
                         f"stride={stride}, spatial_stride={spatial_stride}")
    frame = torch.arange(num_frames, device=device, dtype=torch.float32) * stride
    row = torch.arange(h, device=device, dtype=torch.float32) * spatial_stride
    col = torch.arange(w, device=device, dtype=torch.float32) * spatial_stride
    ids = torch.stack(torch.meshgrid(frame, row, col, indexing="ij"), dim=-1)  # (F, h, w, 3)
    return ids.reshape(num_frames * h * w, 3)  # (N, 3)


def masked_mean(text: Tensor, text_mask: Tensor) -> Tensor:
    """Mean of the real tokens of ``text (B, L, D)`` under ``text_mask (B, L)``; zeros for a caption with none."""
    weights = text_mask.to(text.dtype)[..., None]  # (B, L, 1)
    return (text * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, D)


def load_flux(pretrained_path: str, subfolder: str | None = "transformer") -> FluxTransformer2DModel:
    """Load a ``FluxTransformer2DModel`` from a local folder in diffusers layout."""
    folder = resolve_part_folder(pretrained_path, subfolder, "Flux transformer")
    class_name = config_class_name(folder)
    if class_name not in (None, "FluxTransformer2DModel"):
        raise ValueError(f"Flux: {str(folder)!r} holds a {class_name!r}; expected a FluxTransformer2DModel")
    return FluxTransformer2DModel.from_pretrained(str(folder))


class SplitFluxAttnProcessor:
    """Flux's joint attention with the video tokens split over a context-parallel group: the same projections,
    norms and rotary positions as diffusers' ``FluxAttnProcessor``, with the attention itself through the split
    (the caption's ``prefix`` tokens come first and are every rank's)."""

    def __init__(self, split: TokenSplit, prefix: int):
        self.split, self.prefix = split, prefix

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, image_rotary_emb=None):
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))  # (B, S, H, d)
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:  # a double-stream block: the caption's own projections go first
            encoder_query, encoder_key, encoder_value = (x.unflatten(-1, (-1, attn.head_dim))
                                                         for x in (encoder_query, encoder_key, encoder_value))
            encoder_query, encoder_key = attn.norm_added_q(encoder_query), attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)  # (B, L + N_r, H, d)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = self.split.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                   prefix=self.prefix, mask=attention_mask)  # (B, H, L + N_r, d)
        hidden_states = out.transpose(1, 2).flatten(2, 3).to(query.dtype)  # (B, L + N_r, H·d)
        if encoder_hidden_states is None:
            return hidden_states
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())


class FluxVideoBackbone(nn.Module):
    """A ``FluxTransformer2DModel`` over all frames' tokens, behind ``(x, t, text, text_mask, stride) -> v̂``.

    Args:
        in_channels: latent channels C (from the codec); the model's ``in_channels`` must be ``4·C``.
        text_dim: caption width D (from the text encoder); must equal the model's ``joint_attention_dim``.
        pretrained_path: local folder of a diffusers ``FluxTransformer2DModel``; the pipeline root with a
            ``subfolder``, or the model folder itself.
        subfolder: the model's subfolder inside ``pretrained_path`` (ignored when absent and
            ``pretrained_path`` holds ``config.json``).
        config: a ``FluxTransformer2DModel`` config to build a randomly initialised model instead (exactly one
            of ``pretrained_path`` and ``config``).
        lora: LoRA settings; the loaded model is frozen and only the adapters (and the pooled-text map, if
            any) train.
        gradient_checkpointing: recompute each transformer block in the backward pass to save memory.
    """

    patch_size = PACK
    """Latents per token side (the 2×2 packing); a spatio-temporal pyramid's sizes must divide by it."""
    token_split: TokenSplitFactory | None = None
    """Set for a forward pass under context parallelism (``TPDiffModule``): the video tokens' split over the group."""

    def __init__(
        self,
        in_channels: int,
        text_dim: int,
        pretrained_path: str | None = None,
        subfolder: str | None = "transformer",
        config: dict | None = None,
        lora: LoraSettings | None = None,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        if (pretrained_path is None) == (config is None):
            raise ValueError(f"Flux: give exactly one of pretrained_path and config; got "
                             f"pretrained_path={pretrained_path!r} and config={'set' if config else None}")
        self.model = FluxTransformer2DModel(**config) if config is not None else load_flux(pretrained_path, subfolder)
        self.in_channels, self.text_dim = in_channels, text_dim
        self._check_config(in_channels, text_dim)
        pooled_dim = self.model.config.pooled_projection_dim
        self.pool_proj = nn.Linear(text_dim, pooled_dim) if pooled_dim != text_dim else None
        if self.pool_proj is not None:
            nn.init.zeros_(self.pool_proj.weight)
            nn.init.zeros_(self.pool_proj.bias)
        prepare_training(self, lora, gradient_checkpointing, from_folder=pretrained_path is not None)

    def _check_config(self, in_channels: int, text_dim: int) -> None:
        cfg = self.model.config
        if cfg.patch_size != 1:
            raise ValueError(f"Flux: patch_size={cfg.patch_size} is unsupported; expected 1 (the 2×2 packing "
                             "happens outside the model, as in the Flux pipeline)")
        out_channels = cfg.out_channels or cfg.in_channels
        if cfg.in_channels != PACK * PACK * in_channels or out_channels != cfg.in_channels:
            raise ValueError(
                f"Flux: the model has in_channels={cfg.in_channels}, out_channels={out_channels} (2×2-packed), but "
                f"the codec gives in_channels={in_channels} latent channels; expected both to be "
                f"{PACK * PACK * in_channels} = 4·{in_channels}")
        if cfg.joint_attention_dim != text_dim:
            raise ValueError(f"Flux: the model has joint_attention_dim={cfg.joint_attention_dim}, but the text "
                             f"encoder gives text_dim={text_dim}; expected them equal")
        if cfg.guidance_embeds:
            raise ValueError("Flux: guidance_embeds=True (a guidance-distilled model) is unsupported; expected a "
                             "model trained with classifier-free guidance (guidance_embeds=False)")
        if sum(cfg.axes_dims_rope) != cfg.attention_head_dim:
            raise ValueError(f"Flux: axes_dims_rope={tuple(cfg.axes_dims_rope)} sums to "
                             f"{sum(cfg.axes_dims_rope)}; expected attention_head_dim={cfg.attention_head_dim}")

    def _check_inputs(self, x: Tensor, t: Tensor, text: Tensor, stride: int, spatial_stride: int = 1) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"Flux: expected x of shape (B, {self.in_channels}, F, H, W), got {tuple(x.shape)}")
        B, _, _, H, W = x.shape
        if H % PACK or W % PACK:
            raise ValueError(f"Flux: H={H} and W={W} must both be even (2×2 packing)")
        if text.ndim != 3 or text.shape[0] != B or text.shape[2] != self.text_dim:
            raise ValueError(f"Flux: expected text of shape ({B}, L, {self.text_dim}), got {tuple(text.shape)}")
        if t.ndim > 1 or t.numel() not in (1, B):
            raise ValueError(f"Flux: expected t of shape ({B},), got {tuple(t.shape)}")
        if isinstance(stride, bool) or int(stride) != stride or stride < 1:
            raise ValueError(f"Flux: stride={stride!r} is invalid; expected a positive int")
        if isinstance(spatial_stride, bool) or int(spatial_stride) != spatial_stride or spatial_stride < 1:
            raise ValueError(f"Flux: spatial_stride={spatial_stride!r} is invalid; expected a positive int")

    def pooled_text(self, text: Tensor, text_mask: Tensor) -> Tensor:
        """The pooled caption ``(B, pooled_projection_dim)`` Flux conditions its timestep embedding on."""
        pooled = masked_mean(text, text_mask)  # (B, D)
        return self.pool_proj(pooled) if self.pool_proj is not None else pooled

    def forward(self, x: Tensor, t: Tensor, text: Tensor, text_mask: Tensor | None = None, stride: int = 1,
                spatial_stride: int = 1) -> Tensor:
        """Predict the velocity for latents ``x (B, C, F, H, W)`` at flow timesteps ``t (B,)`` (``t·1000``), given
        captions ``text (B, L, D)`` with ``text_mask (B, L)`` (True on real tokens); frame j sits at temporal
        position j·``stride``, token row and column (a, b) at (a·``spatial_stride``, b·``spatial_stride``).
        Returns ``(B, C, F, H, W)``."""
        self._check_inputs(x, t, text, stride, spatial_stride)
        B, _, F, H, W = x.shape
        L = text.shape[1]
        tokens = pack_frames(x)  # (B, N, C·4)
        img_ids = image_ids(F, H // PACK, W // PACK, int(stride), x.device, int(spatial_stride))  # (N, 3)
        txt_ids = torch.zeros(L, 3, device=x.device)  # (L, 3)
        kwargs = None
        if text_mask is None:
            text_mask = torch.ones(B, L, dtype=torch.bool, device=text.device)
        else:  # masked whatever its values: deciding from them would read the mask back from the device every step
            text_mask = text_mask.bool()
            keep = torch.cat([text_mask, text_mask.new_ones(B, tokens.shape[1])], dim=1)  # (B, L + N), text first
            kwargs = {"attention_mask": keep[:, None, None, :]}  # (B, 1, 1, L + N): masks keys only
        timestep = (t / 1000).expand(B)  # (B,) in [0, 1]; Flux multiplies by 1000 itself
        split = self.token_split(tokens.shape[1]) if self.token_split is not None else None
        if split is None:
            out = self.model(hidden_states=tokens, encoder_hidden_states=text,
                             pooled_projections=self.pooled_text(text, text_mask), timestep=timestep,
                             img_ids=img_ids, txt_ids=txt_ids, joint_attention_kwargs=kwargs).sample  # (B, N, C·4)
            return unpack_frames(out, F, H, W)  # (B, C, F, H, W)
        # Context parallelism: this rank's share of the video tokens (and their positions) goes through the model;
        # the caption is every rank's, and attention reaches every rank's video tokens.
        tokens, img_ids = split.shard(tokens), split.shard(img_ids, dim=0)  # (B, N_r, C·4), (N_r, 3)
        processors = self.model.attn_processors
        self.model.set_attn_processor(SplitFluxAttnProcessor(split, prefix=L))
        try:
            out = self.model(hidden_states=tokens, encoder_hidden_states=text,
                             pooled_projections=self.pooled_text(text, text_mask), timestep=timestep,
                             img_ids=img_ids, txt_ids=txt_ids, joint_attention_kwargs=kwargs).sample  # (B, N_r, C·4)
        finally:
            self.model.set_attn_processor(processors)
        return unpack_frames(split.gather(out), F, H, W)  # (B, C, F, H, W)
