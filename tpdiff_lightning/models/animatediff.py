"""AnimateDiff (Stable Diffusion 1.5 UNet plus motion modules) as a TPDiff backbone: DDIM, ε-prediction.

Notation: B batch, C latent channels, F frames of the current stage, H, W latent height and width,
L text tokens, D text width, S the stage's temporal stride.

The network is diffusers' ``UNetMotionModel``. It takes latents ``(B, C, F, H, W)`` (its docstring says
otherwise), folds the frames into the batch for the spatial layers, and wants the caption once per frame:
``encoder_hidden_states (B·F, L, D)``. Its motion modules add absolute sinusoidal positions ``pe[:, :F]``
before temporal attention; ``StridedSinusoidalPositionalEmbedding`` reads rows ``0, S, 2S, …`` instead, so
frame j of a stage sits at position j·S of the full-rate timeline (SPEC Eq. 14). The output is the
predicted noise ε, which is the DDIM stage target (``TemporalPyramid.interpolate`` returns ``eps_k``), so it
is returned unchanged.

Weights come from a local folder holding a ``UNetMotionModel`` in diffusers layout (``config.json`` plus
safetensors). Users with a separate SD1.5 UNet folder and a ``MotionAdapter`` folder can either pass both
(``pretrained_path`` for the SD1.5 model, ``motion_adapter_path`` for the adapter) or convert them once::

    unet = UNet2DConditionModel.from_pretrained("sd15", subfolder="unet")
    adapter = MotionAdapter.from_pretrained("animatediff-motion-adapter")
    UNetMotionModel.from_unet2d(unet, adapter).save_pretrained("animatediff/unet")

FSDP: wrap the UNet's stages (``CrossAttnDownBlockMotion``, ``DownBlockMotion``, ``UNetMidBlockCrossAttnMotion``,
``CrossAttnUpBlockMotion``, ``UpBlockMotion`` from ``diffusers.models.unets.unet_motion_model``; all in
``tpdiff_lightning.distributed.fsdp2.DEFAULT_BLOCK_CLASSES``).
"""

from __future__ import annotations

from pathlib import Path

from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from diffusers.models.embeddings import SinusoidalPositionalEmbedding
from torch import Tensor, nn

from tpdiff_lightning.models.lora import LoraSettings, prepare_training
from tpdiff_lightning.models.weights_folder import config_class_name, resolve_part_folder

TRAIN_MODES = ("full", "motion")


class StridedSinusoidalPositionalEmbedding(SinusoidalPositionalEmbedding):
    """The motion modules' sinusoidal positions, read at rows ``j·S`` for frames ``j = 0 … F−1`` (Eq. 14).

    It holds the same ``pe`` buffer (same name, same values), so the state dict is unchanged; at stride 1
    it adds exactly the rows the original adds. The stride is set from outside (``set_temporal_stride``)
    and stays set after a forward, so that a gradient-checkpointed motion module recomputed in the
    backward pass sees the stride its forward used.
    """

    def __init__(self, embed_dim: int, max_seq_length: int = 32):
        super().__init__(embed_dim, max_seq_length)
        self.stride = 1

    @classmethod
    def from_module(cls, module: SinusoidalPositionalEmbedding) -> "StridedSinusoidalPositionalEmbedding":
        """A strided copy of ``module`` that shares its ``pe`` tensor."""
        _, max_seq_length, embed_dim = module.pe.shape
        strided = cls(embed_dim, max_seq_length)
        strided.pe = module.pe  # (1, max_seq_length, D), the loaded table itself
        return strided

    @property
    def max_seq_length(self) -> int:
        """Rows in the position table; the largest usable position is one less."""
        return self.pe.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        """Add positions ``0, S, …, (F−1)·S`` to ``x (B·h·w, F, D)``."""
        num_frames, stride = x.shape[1], self.stride
        last = (num_frames - 1) * stride
        if last >= self.max_seq_length:
            raise ValueError(
                f"{num_frames} frames at temporal stride {stride} need position {last}, but the motion modules' "
                f"table has motion_max_seq_length={self.max_seq_length} rows (positions 0..{self.max_seq_length - 1}); "
                "use fewer frames or a model with a longer table")
        return x + self.pe[:, : last + 1 : stride]  # (B·h·w, F, D)


def install_strided_positions(model: nn.Module) -> list[StridedSinusoidalPositionalEmbedding]:
    """Replace every sinusoidal position module in ``model`` by a strided one (in place); returns them all."""
    installed = []
    for name, module in list(model.named_modules()):
        if isinstance(module, StridedSinusoidalPositionalEmbedding):
            installed.append(module)
        elif isinstance(module, SinusoidalPositionalEmbedding):
            parent_name, _, attr = name.rpartition(".")
            strided = StridedSinusoidalPositionalEmbedding.from_module(module)
            setattr(model.get_submodule(parent_name), attr, strided)
            installed.append(strided)
    if not installed:
        raise ValueError(f"{type(model).__name__} has no SinusoidalPositionalEmbedding; expected the motion "
                         "modules of a UNetMotionModel")
    return installed


def set_temporal_stride(model: nn.Module, stride: int) -> None:
    """Set the temporal stride S of every strided position module in ``model``."""
    if isinstance(stride, bool) or int(stride) != stride or stride < 1:
        raise ValueError(f"stride={stride!r} is invalid; expected a positive int")
    for module in model.modules():
        if isinstance(module, StridedSinusoidalPositionalEmbedding):
            module.stride = int(stride)


def load_unet_motion(pretrained_path: str | Path, subfolder: str | None = "unet",
                     motion_adapter_path: str | Path | None = None) -> UNetMotionModel:
    """Load a ``UNetMotionModel`` from a local folder, or build one from an SD1.5 UNet folder plus a
    ``MotionAdapter`` folder (``UNetMotionModel.from_unet2d``)."""
    folder = resolve_part_folder(pretrained_path, subfolder, "AnimateDiff UNet")
    class_name = config_class_name(folder)
    if motion_adapter_path is not None:
        if class_name not in (None, "UNet2DConditionModel"):
            raise ValueError(f"AnimateDiff: with motion_adapter_path, {str(folder)!r} must hold an SD1.5 "
                             f"UNet2DConditionModel, but its config names {class_name!r}")
        adapter_folder = resolve_part_folder(motion_adapter_path, None, "AnimateDiff motion adapter")
        unet = UNet2DConditionModel.from_pretrained(str(folder))
        return UNetMotionModel.from_unet2d(unet, MotionAdapter.from_pretrained(str(adapter_folder)))
    if class_name == "UNet2DConditionModel":
        raise ValueError(
            f"AnimateDiff: {str(folder)!r} holds a plain SD1.5 UNet2DConditionModel (no motion modules); pass "
            "motion_adapter_path=<MotionAdapter folder> too, or convert once with "
            "UNetMotionModel.from_unet2d(unet, adapter).save_pretrained(...)")
    if class_name not in (None, "UNetMotionModel"):
        raise ValueError(f"AnimateDiff: {str(folder)!r} holds a {class_name!r}; expected a UNetMotionModel")
    return UNetMotionModel.from_pretrained(str(folder))


def cross_attention_width(model: UNetMotionModel) -> int:
    """The text width D the UNet's cross-attention expects (one value, even when configured per block)."""
    width = model.config.cross_attention_dim
    widths = set(width) if isinstance(width, (list, tuple)) else {width}
    if len(widths) != 1:
        raise ValueError(f"AnimateDiff: cross_attention_dim={width} differs between blocks; expected one text width")
    return int(widths.pop())


class AnimateDiffBackbone(nn.Module):
    """A ``UNetMotionModel`` behind the backbone interface ``(x, t, text, text_mask, stride) -> ε̂``.

    Args:
        in_channels: latent channels C (from the codec); must equal the UNet's ``in_channels`` and ``out_channels``.
        text_dim: caption width D (from the text encoder); must equal the UNet's ``cross_attention_dim``.
        pretrained_path: local folder of a diffusers ``UNetMotionModel`` (or of an SD1.5 ``UNet2DConditionModel``
            with ``motion_adapter_path``); the pipeline root with a ``subfolder``, or the model folder itself.
        subfolder: the model's subfolder inside ``pretrained_path`` (ignored when absent and ``pretrained_path``
            holds ``config.json``).
        config: a ``UNetMotionModel`` config to build a randomly initialised model instead (exactly one of
            ``pretrained_path`` and ``config``).
        motion_adapter_path: local folder of a diffusers ``MotionAdapter`` to combine with the SD1.5 UNet.
        train_mode: ``"full"`` trains every weight; ``"motion"`` only the motion modules (AnimateDiff's recipe).
        lora: LoRA settings; the base is frozen and only the adapters train (``train_mode`` must be "full").
        gradient_checkpointing: recompute the UNet's blocks in the backward pass to save memory.

    Text mask: ``UNetMotionModel.forward`` has no mask for cross-attention (its ``attention_mask`` reaches the
    spatial blocks' self-attention path), and SD1.5 attends to all 77 CLIP tokens, padding included, so the
    embeddings are passed as they are and ``text_mask`` is accepted but not used.
    """

    def __init__(
        self,
        in_channels: int,
        text_dim: int,
        pretrained_path: str | None = None,
        subfolder: str | None = "unet",
        config: dict | None = None,
        motion_adapter_path: str | None = None,
        train_mode: str = "full",
        lora: LoraSettings | None = None,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        if (pretrained_path is None) == (config is None):
            raise ValueError(f"AnimateDiff: give exactly one of pretrained_path and config; got "
                             f"pretrained_path={pretrained_path!r} and config={'set' if config else None}")
        if train_mode not in TRAIN_MODES:
            raise ValueError(f"AnimateDiff: train_mode={train_mode!r} is invalid; expected one of {TRAIN_MODES}")
        if lora is not None and train_mode != "full":
            raise ValueError(f"AnimateDiff: train_mode={train_mode!r} cannot be combined with LoRA (which trains "
                             "only its adapters); use train_mode='full' and pick lora.target_modules")
        if config is not None and motion_adapter_path is not None:
            raise ValueError("AnimateDiff: motion_adapter_path needs pretrained_path (an SD1.5 UNet folder), "
                             "not config")
        if config is not None:
            self.model = UNetMotionModel(**config)
        else:
            self.model = load_unet_motion(pretrained_path, subfolder, motion_adapter_path)
        self.in_channels, self.text_dim, self.train_mode = in_channels, text_dim, train_mode
        self._check_config(in_channels, text_dim)
        install_strided_positions(self.model)
        if train_mode == "motion":
            self.model.freeze_unet2d_params()
        prepare_training(self, lora, gradient_checkpointing, from_folder=pretrained_path is not None)

    def _check_config(self, in_channels: int, text_dim: int) -> None:
        cfg = self.model.config
        out_channels = cfg.out_channels if cfg.out_channels is not None else cfg.in_channels
        if cfg.in_channels != in_channels or out_channels != in_channels:
            raise ValueError(
                f"AnimateDiff: the UNet has in_channels={cfg.in_channels}, out_channels={out_channels}, but the "
                f"codec gives in_channels={in_channels} latent channels; expected all three equal")
        width = cross_attention_width(self.model)
        if width != text_dim:
            raise ValueError(f"AnimateDiff: the UNet has cross_attention_dim={width}, but the text encoder gives "
                             f"text_dim={text_dim}; expected them equal")

    @property
    def positions(self) -> list[StridedSinusoidalPositionalEmbedding]:
        """The motion modules' strided position modules."""
        return [m for m in self.model.modules() if isinstance(m, StridedSinusoidalPositionalEmbedding)]

    @property
    def max_seq_length(self) -> int:
        """Rows of the motion modules' position table: a stage needs ``(F−1)·S`` below it."""
        return min(p.max_seq_length for p in self.positions)

    def _check_inputs(self, x: Tensor, t: Tensor, text: Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"AnimateDiff: expected x of shape (B, {self.in_channels}, F, H, W), got {tuple(x.shape)}")
        B = x.shape[0]
        if text.ndim != 3 or text.shape[0] != B or text.shape[2] != self.text_dim:
            raise ValueError(f"AnimateDiff: expected text of shape ({B}, L, {self.text_dim}), got {tuple(text.shape)}")
        if t.ndim > 1 or t.numel() not in (1, B):
            raise ValueError(f"AnimateDiff: expected t of shape ({B},), got {tuple(t.shape)}")

    def forward(self, x: Tensor, t: Tensor, text: Tensor, text_mask: Tensor | None = None, stride: int = 1,
                spatial_stride: int = 1) -> Tensor:
        """Predict the noise ε for latents ``x (B, C, F, H, W)`` at DDIM timesteps ``t (B,)`` (``t·999``, floats),
        given captions ``text (B, L, D)``; frame j sits at temporal position j·``stride``. ``text_mask`` is
        unused (see the class docstring). Returns ``(B, C, F, H, W)``.

        ``spatial_stride`` P (a spatio-temporal pyramid's early stages, ``H`` and ``W`` already ``1/P`` of full)
        changes nothing inside: the UNet has no spatial position table to read at ``a·P`` (its convolutions
        place features by their neighbours), so a stage at stride P is a smaller image to it. Any latent size
        works: the UNet hands each up-sampler the size to return to when a size does not halve evenly."""
        if isinstance(spatial_stride, bool) or int(spatial_stride) != spatial_stride or spatial_stride < 1:
            raise ValueError(f"AnimateDiff: spatial_stride={spatial_stride!r} is invalid; expected a positive int")
        self._check_inputs(x, t, text)
        num_frames = x.shape[2]
        set_temporal_stride(self.model, stride)
        context = text.repeat_interleave(num_frames, dim=0)  # (B·F, L, D), one caption copy per frame
        return self.model(x, t, context).sample  # (B, C, F, H, W)
