"""Process groups on the CPU for the multi-process tests: a free local port and a gloo group joined by rank."""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A TCP port on the loopback address that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_gloo_group(rank: int, port: int, world_size: int = 2) -> None:
    """Join the loopback gloo group at ``port`` as ``rank`` of ``world_size``, on one torch thread per process."""
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
