"""Settings a run cannot use, refused by the CLI before the run writes anything: trainer settings Lightning accepts
but fails on later, checkpoint paths, missing data. (The model's own settings are checked by their settings
groups, ``tpdiff_lightning.training.settings``, when the model is built.)

Each error names the key as the user types it (``trainer.accumulate_grad_batches``), the value and what is
expected.
"""

from __future__ import annotations

from pathlib import Path

from tpdiff_lightning.method.values import is_integer, is_number
from tpdiff_lightning.runs.resume import load_problem

# Values of ckpt_path that Lightning resolves itself rather than reading a file.
NAMED_CHECKPOINTS = ("last", "best", "hpc", "registry")


class RunSettingError(ValueError):
    """A setting the run cannot use."""


def trainer_setting_problem(trainer) -> str | None:
    """What is wrong with the first trainer setting Lightning accepts but fails on later (a modulo by zero deep in
    the loop, a negative clip that clips nothing), or ``None``."""
    key = "trainer."
    accumulate = trainer.accumulate_grad_batches
    if not (is_integer(accumulate) and accumulate >= 1):
        return f"{key}accumulate_grad_batches={accumulate!r} is invalid; expected an integer >= 1 (1: no accumulation)"
    interval = trainer.val_check_interval  # a time ("00:01:00:00", a timedelta) is Lightning's to check
    if is_number(interval) and not ((is_integer(interval) and interval >= 1) or 0 < interval <= 1):
        return (f"{key}val_check_interval={interval!r} is invalid; expected an integer >= 1 (batches), a float in "
                "(0, 1] (a fraction of the epoch), a duration, or null")
    every = trainer.check_val_every_n_epoch
    if every is not None and not (is_integer(every) and every >= 1):
        return f"{key}check_val_every_n_epoch={every!r} is invalid; expected an integer >= 1, or null"
    clip = trainer.gradient_clip_val
    if clip is not None and not (is_number(clip) and clip >= 0):
        return f"{key}gradient_clip_val={clip!r} is invalid; expected a number >= 0 (0 or null: no clipping)"
    if not (is_integer(trainer.log_every_n_steps) and trainer.log_every_n_steps >= 1):
        return f"{key}log_every_n_steps={trainer.log_every_n_steps!r} is invalid; expected an integer >= 1"
    return None


def check_run_settings(subcommand: str, model, ckpt_path: str | None, untrained: bool = False,
                       trainer=None) -> None:
    """Raise :class:`RunSettingError` for the first setting of ``subcommand`` that cannot work."""
    problem = trainer_setting_problem(trainer) if trainer is not None else None
    if problem is not None:
        raise RunSettingError(problem)
    frames = model.settings.sampling.num_frames  # the model's own settings were checked when it was built
    if frames is not None and subcommand == "predict":
        try:
            model.pyramid.with_num_frames(model.latent_frames(frames))
        except ValueError as error:
            raise RunSettingError(f"model.init_args.sampling.num_frames={frames} is invalid: {error}") from None
    if ckpt_path and str(ckpt_path) not in NAMED_CHECKPOINTS and "://" not in str(ckpt_path):
        path = Path(str(ckpt_path))
        if not path.exists():
            raise RunSettingError(f"ckpt_path={ckpt_path}: no such file or folder")
        if path.is_dir() and (why := load_problem(path)[1]) is not None:
            raise RunSettingError(f"ckpt_path={ckpt_path} {why}; expected a .ckpt file or a sharded checkpoint "
                                  "folder (--ckpt_path last picks the run's newest one)")
    if subcommand == "predict" and not ckpt_path and not untrained:
        raise RunSettingError("predict needs --ckpt_path (a trained checkpoint); pass --untrained true to sample "
                              "from the untrained network on purpose")


def check_data_settings(subcommand: str, datamodule, trainer=None) -> None:
    """Raise :class:`RunSettingError` when ``fit``/``validate`` would find no shards to read (a root without a
    manifest, a missing split or shard), also for the eval split a fit validates on. Roots the data module builds
    synthetic data into are left to it."""
    if subcommand not in ("fit", "validate") or not hasattr(datamodule, "shard_urls"):
        return
    if datamodule.will_build_synthetic():
        return  # prepare_data builds the synthetic data there
    validates = subcommand == "validate" or trainer is None or trainer.limit_val_batches != 0
    for split in (["train"] if subcommand == "fit" else []) + (["eval"] if validates else []):
        try:
            datamodule.shard_urls(split)
        except FileNotFoundError as error:
            raise RunSettingError(f"data.init_args.root={datamodule.root}: {error}") from None
