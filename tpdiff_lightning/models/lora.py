"""LoRA adapters on diffusers backbones through ``peft``: add, read back, export, and merge.

A LoRA run trains only the adapter (plus any parts named as trainable); the base weights stay frozen
and are loaded from their local folder every time, so checkpoints and exports hold the adapter alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn

ADAPTER_NAME = "default"


@dataclass
class LoraSettings:
    """LoRA hyperparameters.

    Args:
        rank: adapter rank r (the paper's Wan2.1 run uses 128).
        alpha: scaling numerator; the update is scaled by ``alpha / rank`` (default: equal to ``rank``).
        target_modules: names (or name suffixes) of the linear layers that get adapters.
        dropout: dropout on the adapter's input.
    """

    rank: int = 128
    alpha: float | None = None
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if int(self.rank) < 1:
            raise ValueError(f"LoRA rank={self.rank} is invalid; expected a positive int")
        if not self.target_modules:
            raise ValueError("LoRA target_modules is empty; expected layer names such as ['to_q', 'to_k']")

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=int(self.rank), lora_alpha=float(self.alpha if self.alpha is not None else self.rank),
                          target_modules=list(self.target_modules), lora_dropout=float(self.dropout),
                          init_lora_weights=True)


def add_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Freeze ``model`` and add trainable LoRA adapters to its ``target_modules`` (in place)."""
    model.requires_grad_(False)
    config = settings.peft_config()
    if hasattr(model, "add_adapter"):  # diffusers ModelMixin
        model.add_adapter(config, adapter_name=ADAPTER_NAME)
    else:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    if not any(p.requires_grad for p in model.parameters()):
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"LoRA target_modules={settings.target_modules} matched no layer; linear layers "
                         f"here are named {names[:30]}")
    return model


def prepare_training(owner: nn.Module, lora: LoraSettings | None, gradient_checkpointing: bool,
                     from_folder: bool) -> None:
    """The last construction step shared by the diffusers backbones, on ``owner.model``: add LoRA (which freezes
    the base; the adapter is kept in float32 whatever the base's dtype), turn on gradient checkpointing, and, for weights loaded from a folder, keep the frozen ones out
    of state dicts (the folder supplies them again)."""
    from tpdiff_lightning.models.weights_folder import exclude_frozen_from_state_dict

    if lora is not None:
        add_lora(owner.model, lora)
        # peft creates the adapter in the base's dtype; bf16 adapter weights would lose most AdamW updates.
        for p in owner.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if gradient_checkpointing:
        owner.model.enable_gradient_checkpointing()
    if from_folder:
        exclude_frozen_from_state_dict(owner, "model")


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` carries peft LoRA layers."""
    return any("lora_" in name for name, _ in model.named_parameters())


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors alone, with peft's key names."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)


def save_adapter(model: nn.Module, out_dir: str | Path) -> Path:
    """Write the adapter in peft/diffusers format (``adapter_config.json`` + ``adapter_model.safetensors``
    in peft layout, and ``pytorch_lora_weights.safetensors`` in diffusers layout where supported)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.peft_config[ADAPTER_NAME]
    config.save_pretrained(str(out))
    state = {k: v.detach().contiguous().cpu() for k, v in lora_state_dict(model).items()}
    save_file(state, str(out / "adapter_model.safetensors"))
    if hasattr(model, "save_lora_adapter"):
        model.save_lora_adapter(str(out), adapter_name=ADAPTER_NAME)
    return out


def load_adapter(model: nn.Module, adapter_dir: str | Path, settings: LoraSettings | None = None) -> nn.Module:
    """Add an adapter saved by ``save_adapter`` to a freshly loaded base ``model``."""
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(adapter_dir)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (folder / name).exists():
            raise FileNotFoundError(f"adapter folder {str(folder)!r} has no {name}; expected the output of "
                                    "the LoRA export command")
    config = LoraConfig.from_pretrained(str(folder))
    settings = settings or LoraSettings(rank=config.r, alpha=config.lora_alpha,
                                        target_modules=sorted(config.target_modules), dropout=config.lora_dropout)
    if not has_lora(model):
        add_lora(model, settings)
    result = set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")),
                                       adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"adapter {str(folder)!r} does not fit this model: unexpected keys {unexpected[:5]}")
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapter into the base weights and remove the LoRA layers (in place)."""
    if not (hasattr(model, "fuse_lora") and hasattr(model, "unload_lora")):
        raise TypeError(f"cannot merge LoRA into a {type(model).__name__}; expected a diffusers model "
                        "(with fuse_lora/unload_lora)")
    model.fuse_lora(lora_scale=1.0)
    model.unload_lora()
    return model
