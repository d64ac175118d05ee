"""An exponential moving average of a network's trainable weights.

Only trainable parameters are shadowed, so a LoRA run keeps an EMA of the adapter alone and never
copies the frozen base. Sampling swaps the averaged weights in for the duration of a ``with`` block.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn


def _shadow_name(param_name: str) -> str:
    return param_name.replace(".", "__")


class EMA(nn.Module):
    """Shadow copies of ``model``'s trainable parameters tracking ``decay * shadow + (1 - decay) * weight``.

    The shadows are float32 frozen parameters (``requires_grad=False``): they are saved in and restored
    from checkpoints and follow ``.to(device)`` but not casts to another dtype, no optimizer sees them, and, unlike buffers, DDP does not broadcast
    them from rank 0 before every forward (they are identical on every rank anyway).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay={decay} is invalid; expected 0 <= decay < 1")
        self.decay = decay
        self.warmup = warmup
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        # A host copy of ``num_updates``: reading the buffer every step would stall the device (a host sync).
        # Set from the buffer on the first update after construction or after loading a state dict.
        self._host_num_updates: int | None = None
        self.names: list[str] = []
        self.reset(model)

    def reset(self, model: nn.Module) -> None:
        """Shadow ``model``'s current trainable parameters (again), e.g. after they were sharded or wrapped."""
        for name in self.names:
            delattr(self, _shadow_name(name))
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        for name in self.names:
            shadow = nn.Parameter(params[name].detach().clone().float(), requires_grad=False)
            self.register_parameter(_shadow_name(name), shadow)

    def _apply(self, fn, recurse: bool = True):
        """Follow device moves, but keep the shadows in float32 whatever dtype the model is cast to
        (Lightning's ``bf16-true`` casts the whole module): a 0.999 decay moves a weight by 0.1% of the
        gap per step, less than bf16 can represent, so a bf16 average would stop moving."""
        before = {name: getattr(self, _shadow_name(name)).data for name in self.names}  # references, no copies
        super()._apply(fn, recurse)
        for name, old in before.items():
            shadow = getattr(self, _shadow_name(name))
            if shadow.is_floating_point() and shadow.dtype != torch.float32:
                # from the float32 values, not the cast ones: a bf16 round trip would lose the average's digits
                shadow.data = old.to(device=shadow.device, dtype=torch.float32)
        return self

    def shadows(self) -> list[Tensor]:
        """The averaged tensors, in the order of ``self.names``."""
        return [getattr(self, _shadow_name(n)) for n in self.names]

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._host_num_updates = None  # read the loaded count once, at the next update

    def updates_so_far(self) -> int:
        """``num_updates`` as a Python int, read from the device once and then counted on the host."""
        if self._host_num_updates is None:
            self._host_num_updates = int(self.num_updates)
        return self._host_num_updates

    def current_decay(self) -> float:
        """The decay, ramped up as ``(1 + n) / (10 + n)`` at first so early weights are forgotten quickly."""
        n = self.updates_so_far()
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    def _params(self, model: nn.Module) -> list[nn.Parameter]:
        params = dict(model.named_parameters())
        missing = [n for n in self.names if n not in params]
        if missing:
            raise KeyError(f"EMA tracks parameters the model does not have: {missing[:5]}")
        return [params[n] for n in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadows one step towards ``model``'s trainable weights."""
        decay = self.current_decay()
        shadows = self.shadows()
        if shadows:
            params = self._params(model)
            torch._foreach_lerp_(shadows, [p.detach().to(s.dtype) for s, p in zip(shadows, params)], 1.0 - decay)
        self.num_updates += 1  # on the device, no sync
        self._host_num_updates = self.updates_so_far() + 1

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block, ``model``'s trainable weights are the averaged ones; restored afterwards."""
        params = self._params(model)
        backup = [p.detach().clone() for p in params]
        try:
            with torch.no_grad():
                for p, s in zip(params, self.shadows()):
                    p.copy_(s.to(p.dtype))
            yield model
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)
