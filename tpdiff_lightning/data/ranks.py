"""Which clips a process reads: its data-parallel replica. Under context parallelism the ranks of a group split one
clip's tokens, so they read the same clips (and draw the same noise); otherwise every rank is its own replica."""

from __future__ import annotations


def data_parallel(trainer) -> tuple[int, int]:
    """``(replica, replicas)`` of the process: the strategy's ``data_parallel_rank``/``data_parallel_size`` where it
    has them (``FSDP2Strategy``), else the global rank and world size; ``(0, 1)`` without a trainer."""
    if trainer is None:
        return 0, 1
    strategy = getattr(trainer, "strategy", None)
    rank = getattr(strategy, "data_parallel_rank", None)
    if rank is None:
        return trainer.global_rank, trainer.world_size
    return rank, strategy.data_parallel_size


def context_parallel_rank(trainer) -> int:
    """The process's place in its context-parallel group (0 without one): only rank 0 of a group writes what the
    group produced together."""
    cp = getattr(getattr(trainer, "strategy", None), "context_parallel", None) if trainer is not None else None
    return cp.rank if cp is not None else 0
