"""Wan2.1 (diffusers ``WanTransformer3DModel``) as a TPDiff backbone: stride-aware rotary positions, LoRA.

Notation: B batch, C latent channels, F frames of the current stage, H, W latent height and width,
L text tokens, D text width, S the stage's temporal stride, P its spatial stride (spatio-temporal pyramid),
(p_t, p_h, p_w) Wan's patch size.

Velocity convention. Wan2.1 is trained by flow matching with ``x_t = (1 − σ)·x0 + σ·ε`` and predicts
``v = ε − x0`` (diffusers' ``FlowMatchEulerDiscreteScheduler`` steps ``x ← x + (σ' − σ)·v``), told the
timestep ``σ·1000``. This project uses the same path (``x_t = (1 − t)·x0 + t·ε``, SPEC "Conventions"), and
its flow target ``x̂_s − x̂_e`` is the derivative towards the noisier end, which at one stage is ``ε − x0``;
the sampler steps ``x ← x + (u' − u)·v`` the same way. The signs agree, so the adapter returns Wan's
output unchanged (pinned by a test against diffusers' scheduler).

Inside a stage of a pyramid, the module's ``flow_velocity`` chooses the target (docs/method.md):
``"global"`` (what ``configs/wan_lora_flow.yaml`` uses) is the velocity in global time,
``(x̂_s − x̂_e)/(s_i − e_i) = ε_k − x̄``, the ordinary flow target of the stage's virtual pair, so a pretrained Wan
predicts it from its first step; ``"stage"`` (the paper's Eq. 13) is the velocity in the stage's own time u,
``(s_i − e_i)`` times larger, which a pretrained Wan would have to learn by that factor on the shorter stages.

FSDP: the repeated block class is ``diffusers.models.transformers.transformer_wan.WanTransformerBlock``, one of
``tpdiff_lightning.distributed.fsdp2.DEFAULT_BLOCK_CLASSES``; name it in ``auto_wrap_policy`` / ``activation_checkpointing_policy``.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, WanRotaryPosEmbed
from diffusers.models.transformers.transformer_wan import _get_qkv_projections as _get_wan_qkv_projections
from torch import Tensor, nn

from tpdiff_lightning.models.lora import LoraSettings, has_lora, lora_state_dict, prepare_training
from tpdiff_lightning.models.token_split import TokenSplit, TokenSplitFactory
from tpdiff_lightning.models.weights_folder import cast_keeping_fp32_modules, parse_dtype, resolve_part_folder


class StridedWanRotaryPosEmbed(WanRotaryPosEmbed):
    """Wan's rotary embedding with frame j at temporal position ``j·stride`` (SPEC Eq. 14), and token row and
    column ``(a, b)`` at ``(a·spatial_stride, b·spatial_stride)`` of the full-resolution grid.

    The tables are Wan's own (copied from the module it replaces, non-persistent buffers), so the state
    dict is unchanged; set ``stride`` (and ``spatial_stride``) before the forward. At strides 1 the output
    is Wan's, bit for bit.
    """

    stride: int = 1
    spatial_stride: int = 1

    @classmethod
    def from_original(cls, rope: WanRotaryPosEmbed) -> "StridedWanRotaryPosEmbed":
        """A strided copy of ``rope`` sharing its cos/sin tables (same dtype and device)."""
        if not isinstance(rope, WanRotaryPosEmbed):
            raise TypeError(f"expected a WanRotaryPosEmbed to replace, got {type(rope).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name in ("attention_head_dim", "patch_size", "max_seq_len", "t_dim", "h_dim", "w_dim"):
            setattr(new, name, getattr(rope, name))
        new.register_buffer("freqs_cos", rope.freqs_cos, persistent=False)
        new.register_buffer("freqs_sin", rope.freqs_sin, persistent=False)
        new.stride = 1
        new.spatial_stride = 1
        return new

    def temporal_positions(self, num_frames: int) -> Tensor:
        """Rows ``0, S, 2S, …`` of the temporal table for ``num_frames`` latent frames (after patching)."""
        S = int(self.stride)
        if S < 1:
            raise ValueError(f"rotary stride={self.stride} is invalid; expected a positive int")
        last = (num_frames - 1) * S
        if last >= self.max_seq_len:
            raise ValueError(
                f"temporal position {last} (frames={num_frames}, stride={S}) exceeds the rotary table of "
                f"rope_max_seq_len={self.max_seq_len}; expected (frames - 1) * stride < rope_max_seq_len")
        return torch.arange(num_frames, device=self.freqs_cos.device) * S

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor]:
        """``(cos, sin)``, each ``(1, F'·h·w, 1, head_dim)``, for latents ``(B, C, F, H, W)``."""
        _, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.patch_size
        ppf, pph, ppw = num_frames // p_t, height // p_h, width // p_w
        P = int(self.spatial_stride)
        if P < 1:
            raise ValueError(f"rotary spatial_stride={self.spatial_stride} is invalid; expected a positive int")
        if (max(pph, ppw) - 1) * P + 1 > self.max_seq_len:
            raise ValueError(f"latent grid {pph}x{ppw} at spatial stride {P} exceeds rope_max_seq_len={self.max_seq_len}")
        pos_t = self.temporal_positions(ppf)  # (F',)
        rows = slice(None, pph) if P == 1 else torch.arange(pph, device=self.freqs_cos.device) * P  # (h,)
        cols = slice(None, ppw) if P == 1 else torch.arange(ppw, device=self.freqs_cos.device) * P  # (w,)
        split = [self.t_dim, self.h_dim, self.w_dim]
        tables = []
        for table in (self.freqs_cos, self.freqs_sin):  # (max_seq_len, head_dim) each
            t_tab, h_tab, w_tab = table.split(split, dim=1)
            f = t_tab[pos_t].view(ppf, 1, 1, -1).expand(ppf, pph, ppw, -1)  # (F', h, w, t_dim)
            h = h_tab[rows].view(1, pph, 1, -1).expand(ppf, pph, ppw, -1)  # (F', h, w, h_dim)
            w = w_tab[cols].view(1, 1, ppw, -1).expand(ppf, pph, ppw, -1)  # (F', h, w, w_dim)
            tables.append(torch.cat([f, h, w], dim=-1).reshape(1, ppf * pph * ppw, 1, -1))  # (1, N, 1, head_dim)
        return tables[0], tables[1]


def check_wan_config(config: dict[str, Any], in_channels: int, text_dim: int, source: str) -> None:
    """Raise if the Wan config does not fit the project's latents and text, or has a temporal patch."""
    model_in = config.get("in_channels", 16)
    model_out = config.get("out_channels") or model_in
    if in_channels != model_in or model_out != in_channels:
        raise ValueError(f"in_channels={in_channels} (from the codec) does not match the Wan transformer in {source}: "
                         f"config in_channels={model_in}, out_channels={model_out}")
    if text_dim != config.get("text_dim", 4096):
        raise ValueError(f"text_dim={text_dim} (from the text encoder) does not match the Wan transformer in "
                         f"{source}: config text_dim={config.get('text_dim', 4096)}")
    patch = tuple(config.get("patch_size", (1, 2, 2)))
    if patch[0] != 1:
        raise ValueError(f"Wan patch_size={patch} in {source} has temporal patch {patch[0]}; expected 1, so that "
                         "every stage's frame count (any F) reaches the model frame by frame")


class SplitWanAttnProcessor(WanAttnProcessor):
    """Wan's self-attention with the video tokens split over a context-parallel group: the same projections, norms
    and rotary positions as diffusers' ``WanAttnProcessor``, with the attention itself through the split. Cross-
    attention (to the caption, every rank's) goes to diffusers' processor unchanged."""

    def __init__(self, split: TokenSplit):
        super().__init__()
        self.split = split

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, rotary_emb: tuple[Tensor, Tensor] | None = None) -> Tensor:
        if encoder_hidden_states is not None or attn.add_k_proj is not None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = _get_wan_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))  # (B, N_r, H, d)
        if rotary_emb is not None:
            query, key = rotate_wan(query, *rotary_emb), rotate_wan(key, *rotary_emb)
        out = self.split.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                   mask=attention_mask)  # (B, H, N_r, d)
        hidden_states = out.transpose(1, 2).flatten(2, 3).type_as(query)  # (B, N_r, H·d)
        return attn.to_out[1](attn.to_out[0](hidden_states))


def rotate_wan(x: Tensor, freqs_cos: Tensor, freqs_sin: Tensor) -> Tensor:
    """Wan's rotary embedding on interleaved pairs of ``x (B, N, H, d)`` (as ``WanAttnProcessor`` applies it)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def split_wan_tokens(model: WanTransformer3DModel, split: TokenSplit) -> list:
    """Run ``model``'s next forward on this rank's share of the tokens: the first block takes the share of the
    patch embeddings, every block its share of the rotary positions and the split self-attention, and the output
    projection's tokens are gathered back (Wan unpatchifies the whole grid). Returns the undo callables."""
    processors = model.attn_processors
    model.set_attn_processor(SplitWanAttnProcessor(split))

    def shard_inputs(block: nn.Module, args: tuple) -> tuple:
        hidden, text, timestep, (cos, sin) = args
        if block is model.blocks[0]:
            hidden = split.shard(hidden)  # (B, N_r, D)
        return hidden, text, timestep, (split.shard(cos), split.shard(sin))  # (1, N_r, 1, d) each

    handles = [block.register_forward_pre_hook(shard_inputs) for block in model.blocks]
    handles.append(model.proj_out.register_forward_hook(lambda module, args, out: split.gather(out)))
    return [handle.remove for handle in handles] + [lambda: model.set_attn_processor(processors)]


class WanBackbone(nn.Module):
    """``WanTransformer3DModel`` behind the backbone interface ``(x, t, text, text_mask, stride) -> velocity``
    (plus ``spatial_stride`` at the smaller stages of a spatio-temporal pyramid).

    Args:
        in_channels: latent channels (from the codec); must equal the model's in/out channels.
        text_dim: text token width (from the text encoder); must equal the model's ``text_dim``.
        pretrained_path: local diffusers folder (a pipeline folder with ``subfolder``, or the transformer
            folder itself). Exactly one of ``pretrained_path`` and ``config``.
        subfolder: the transformer's subfolder in a pipeline folder.
        config: ``WanTransformer3DModel`` init kwargs, for a randomly initialised model (from scratch, tests).
        lora: LoRA settings; when given the base is frozen and only the adapters train (paper: r = 128).
        gradient_checkpointing: recompute each transformer block in the backward pass.
        torch_dtype: weight dtype (e.g. ``"bfloat16"`` for a frozen base under LoRA); default float32.
        text_length: pad the text with zero tokens to this length (Wan2.1 was trained on UMT5 text padded
            with zeros to 512 tokens; set 512 for a pretrained checkpoint). ``None`` keeps the given length.
    """

    token_split: TokenSplitFactory | None = None
    """Set for a forward pass under context parallelism (``TPDiffModule``): the video tokens' split over the group."""

    def __init__(
        self,
        in_channels: int,
        text_dim: int,
        pretrained_path: str | None = None,
        subfolder: str | None = "transformer",
        config: dict[str, Any] | None = None,
        lora: LoraSettings | None = None,
        gradient_checkpointing: bool = False,
        torch_dtype: str | None = None,
        text_length: int | None = None,
    ):
        super().__init__()
        if (pretrained_path is None) == (config is None):
            raise ValueError(f"WanBackbone needs exactly one of pretrained_path and config; got "
                             f"pretrained_path={pretrained_path!r} and config={'given' if config else None}")
        if text_length is not None and text_length < 1:
            raise ValueError(f"text_length={text_length} is invalid; expected a positive int or None")
        dtype = parse_dtype(torch_dtype)
        if pretrained_path is not None:
            folder = resolve_part_folder(pretrained_path, subfolder, "Wan transformer")
            check_wan_config(dict(WanTransformer3DModel.load_config(str(folder))), in_channels, text_dim, str(folder))
            self.model = WanTransformer3DModel.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
        else:
            check_wan_config(dict(config), in_channels, text_dim, "the given config")
            self.model = WanTransformer3DModel(**config)
            if dtype is not None:
                cast_keeping_fp32_modules(self.model, dtype)  # as from_pretrained(torch_dtype=...) does
        self.model.rope = StridedWanRotaryPosEmbed.from_original(self.model.rope)
        self.in_channels = in_channels
        self.text_dim = text_dim
        self.text_length = text_length
        self.patch_size = tuple(self.model.config.patch_size)
        prepare_training(self, lora, gradient_checkpointing, from_folder=pretrained_path is not None)


    @property
    def has_lora(self) -> bool:
        """Whether LoRA adapters were added."""
        return has_lora(self.model)

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The LoRA adapter tensors alone (peft key names), without any base weight."""
        if not self.has_lora:
            raise ValueError("this WanBackbone has no LoRA adapter; build it with lora=LoraSettings(...)")
        return lora_state_dict(self.model)

    def _check_inputs(self, x: Tensor, t: Tensor, text: Tensor, text_mask: Tensor | None, stride: int,
                      spatial_stride: int = 1) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected x of shape (B, {self.in_channels}, F, H, W), got {tuple(x.shape)}")
        B, _, _, H, W = x.shape
        _, p_h, p_w = self.patch_size
        if H % p_h or W % p_w:
            raise ValueError(f"latent H={H}, W={W} must be divisible by Wan's spatial patch size ({p_h}, {p_w})")
        if t.shape != (B,):
            raise ValueError(f"expected timesteps t of shape ({B},), got {tuple(t.shape)}")
        if text.ndim != 3 or text.shape[0] != B or text.shape[2] != self.text_dim:
            raise ValueError(f"expected text of shape ({B}, L, {self.text_dim}), got {tuple(text.shape)}")
        if text_mask is not None and tuple(text_mask.shape) != tuple(text.shape[:2]):
            raise ValueError(f"expected text_mask of shape {tuple(text.shape[:2])}, got {tuple(text_mask.shape)}")
        if self.text_length is not None and text.shape[1] > self.text_length:
            raise ValueError(f"text has {text.shape[1]} tokens, more than text_length={self.text_length}")
        if int(stride) != stride or stride < 1:
            raise ValueError(f"stride={stride} is invalid; expected a positive int")
        if int(spatial_stride) != spatial_stride or spatial_stride < 1:
            raise ValueError(f"spatial_stride={spatial_stride} is invalid; expected a positive int")

    def prepare_text(self, text: Tensor, text_mask: Tensor | None) -> Tensor:
        """Zero the padding tokens and pad with zero tokens to ``text_length``, as Wan saw text in training."""
        if text_mask is not None:
            text = text * text_mask[..., None].to(text.dtype)  # (B, L, D)
        if self.text_length is not None and text.shape[1] < self.text_length:
            pad = text.new_zeros(text.shape[0], self.text_length - text.shape[1], text.shape[2])
            text = torch.cat([text, pad], dim=1)  # (B, text_length, D)
        return text

    def forward(self, x: Tensor, t: Tensor, text: Tensor, text_mask: Tensor | None = None, stride: int = 1,
                spatial_stride: int = 1) -> Tensor:
        """Velocity ``ε − x0`` for latents ``x (B, C, F, H, W)`` at timesteps ``t (B,)`` in [0, 1000], captions
        ``text (B, L, D)`` with ``text_mask (B, L)`` (True on real tokens), frames at positions ``j·stride`` and
        token rows and columns at ``a·spatial_stride``."""
        self._check_inputs(x, t, text, text_mask, stride, spatial_stride)
        text = self.prepare_text(text, text_mask)
        dtype = self.model.patch_embedding.weight.dtype
        self.model.rope.stride = int(stride)
        self.model.rope.spatial_stride = int(spatial_stride)
        p_t, p_h, p_w = self.model.config.patch_size
        tokens = (x.shape[2] // p_t) * (x.shape[3] // p_h) * (x.shape[4] // p_w)
        split = self.token_split(tokens) if self.token_split is not None else None
        undo = split_wan_tokens(self.model, split) if split is not None else []
        try:
            out = self.model(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=text.to(dtype),
                             return_dict=False)[0]  # (B, C, F, H, W)
        finally:
            self.model.rope.stride = 1
            self.model.rope.spatial_stride = 1
            for handle in undo:
                handle()
        return out  # Wan's ε − x0 is already this project's flow target (module docstring)
