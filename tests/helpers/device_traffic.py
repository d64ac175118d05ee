"""Counting the host-device traffic of a piece of code on a CPU-only machine.

The code runs on the ``meta`` device, which holds no data: every copy from the host to it, and every read back
from it (``.item()``, ``bool()``, ``.tolist()``, ``.cpu()``), shows up as an operation between the CPU and ``meta``.
On a GPU each of these is a copy the host waits for, and a read is a full device sync.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
         torch.ops.aten.equal.default}
COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}


def _devices(tree) -> set[str]:
    found = set()
    for value in torch.utils._pytree.tree_leaves(tree):
        if isinstance(value, torch.Tensor):
            found.add(value.device.type)
    return found


@dataclass
class Traffic:
    to_device: list[str] = field(default_factory=list)
    """Host-to-device copies: the op and the shape copied."""
    reads: list[str] = field(default_factory=list)
    """Reads back from the device."""


class _Counter(TorchDispatchMode):
    def __init__(self, traffic: Traffic):
        super().__init__()
        self.traffic = traffic

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in READS and "meta" in _devices((args, kwargs)):
            self.traffic.reads.append(str(func))
            return False if func in (torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default) else 0
        out = func(*args, **kwargs)
        if func in COPIES:
            source = _devices(args[1] if func == torch.ops.aten.copy_.default else args[0])
            target = _devices(out)
            if source == {"cpu"} and target == {"meta"}:
                self.traffic.to_device.append(f"{func} {tuple(out.shape)}")
            elif source == {"meta"} and target == {"cpu"}:
                self.traffic.reads.append(f"{func} {tuple(out.shape)}")
        return out


def device_traffic(fn) -> Traffic:
    """Run ``fn`` (whose tensors live on ``meta``) and return what it copied to and read from the device.

    ``torch.tensor(value, device=...)`` builds its tensor outside the dispatcher, so it is counted by wrapping it.
    """
    traffic = Traffic()
    original = torch.tensor

    def counted_tensor(*args, **kwargs):
        out = original(*args, **kwargs)
        if out.device.type == "meta":
            traffic.to_device.append(f"torch.tensor {tuple(out.shape)}")
        return out

    torch.tensor = counted_tensor
    try:
        with _Counter(traffic):
            fn()
    finally:
        torch.tensor = original
    return traffic
