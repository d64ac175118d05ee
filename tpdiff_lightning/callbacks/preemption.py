"""A preempted run (SIGTERM: a cluster's preemption, ``scancel``, ``kill``) saves where it is and says so."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tpdiff_lightning.callbacks.checkpoint import save_checkpoint_now

SIGTERM_EXIT_CODE = 143
"""128 + SIGTERM: what a shell and the schedulers report for a process ended by SIGTERM."""


class PreemptedError(RuntimeError):
    """The run received SIGTERM; ``saved`` is the checkpoint it wrote first (None when it could not write one)."""

    def __init__(self, message: str, saved: str | None):
        super().__init__(message)
        self.saved = saved


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM during ``fit``, Lightning stops the loop at the next batch boundary; this callback then saves a
    step checkpoint through the run's ``ModelCheckpoint`` (and re-points ``last.ckpt``), so ``--ckpt_path last``
    resumes at the step the run reached. The CLI turns the stop into one line and exit status 143.

    Under SLURM, Lightning's own auto-requeue (``#SBATCH --signal=SIGUSR1@90``) saves and requeues instead; a
    requeued job resumes from that checkpoint by itself.
    """

    def __init__(self) -> None:
        self.saved: str | None = None
        self.reason: str | None = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        step = trainer.global_step
        callbacks = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
        if not callbacks:
            self.reason = "the run has no ModelCheckpoint callback to save through"
        elif callbacks[0]._last_global_step_saved == step:
            self.saved = callbacks[0]._last_checkpoint_saved  # this step was saved just before the signal
        else:
            try:
                self.saved = save_checkpoint_now(callbacks[0], trainer)
            except Exception as error:  # a full disk: say so, and still stop with the preemption status
                self.reason = f"saving failed ({type(error).__name__}: {error})"
        if self.saved is None:
            rank_zero_warn(f"SIGTERM at global step {step}: no checkpoint saved: {self.reason}")

    def message(self, step: int) -> str:
        if self.saved is not None:
            return (f"stopped by SIGTERM at global step {step}; saved {self.saved}. Resume with the same command "
                    "and --ckpt_path last")
        return f"stopped by SIGTERM at global step {step}; no checkpoint saved: {self.reason}"
