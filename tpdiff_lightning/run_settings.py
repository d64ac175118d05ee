"""Settings the model accepts but a run cannot use, refused by the CLI before the run writes anything.

Each error names the key as the user types it (``model.init_args.lr``), the value and what is expected.
"""

from __future__ import annotations

from pathlib import Path

from tpdiff_lightning.resume import load_problem
from tpdiff_lightning.values import is_integer, is_number

# Values of ckpt_path that Lightning resolves itself rather than reading a file.
NAMED_CHECKPOINTS = ("last", "best", "hpc", "registry")


class RunSettingError(ValueError):
    """A setting the run cannot use."""


def model_setting_problem(hp, num_stages: int | None) -> str | None:
    """What is wrong with the first model setting no subcommand can use, or ``None``."""
    key = "model.init_args."
    if "lr" in hp and not (is_number(hp.lr) and hp.lr > 0):
        return f"{key}lr={hp.lr!r} is invalid; expected a learning rate > 0"
    if "warmup_steps" in hp and not (is_integer(hp.warmup_steps) and hp.warmup_steps >= 0):
        return f"{key}warmup_steps={hp.warmup_steps!r} is invalid; expected an integer >= 0 (0: no warmup)"
    if "weight_decay" in hp and not (is_number(hp.weight_decay) and hp.weight_decay >= 0):
        return f"{key}weight_decay={hp.weight_decay!r} is invalid; expected a number >= 0 (0: none)"
    if "text_lr_scale" in hp and not (is_number(hp.text_lr_scale) and hp.text_lr_scale > 0):
        return f"{key}text_lr_scale={hp.text_lr_scale!r} is invalid; expected a number > 0"
    betas = hp.get("betas")
    if betas is not None and not (len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas)):
        return f"{key}betas={list(betas)!r} is invalid; expected two numbers in [0, 1), e.g. [0.9, 0.999]"
    ema = hp.get("ema_decay")
    if ema is not None and not (is_number(ema) and 0 <= ema < 1):
        return f"{key}ema_decay={ema!r} is invalid; expected a number in [0, 1), or null for no EMA"
    if "guidance_scale" in hp and not (is_number(hp.guidance_scale) and hp.guidance_scale >= 0):
        return f"{key}guidance_scale={hp.guidance_scale!r} is invalid; expected >= 0 (1: no guidance, 0: unconditional)"
    steps = hp.get("sample_steps")
    if steps is not None and num_stages is not None and not (is_integer(steps) and steps >= num_stages):
        return (f"{key}sample_steps={steps!r} is invalid; expected an integer of at least one step per stage, "
                f">= {num_stages} (num_stages)")
    return None


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
    hp = model.hparams
    key = "model.init_args."
    pyramid = getattr(model, "pyramid", None)
    problem = model_setting_problem(hp, pyramid.num_stages if pyramid is not None else None)
    if problem is None and trainer is not None:
        problem = trainer_setting_problem(trainer)
    if problem is not None:
        raise RunSettingError(problem)
    frames = hp.get("sample_num_frames")
    if frames is not None and pyramid is not None and subcommand == "predict":
        try:
            pyramid.with_num_frames(model.latent_frames(frames))
        except ValueError as error:
            raise RunSettingError(f"{key}sample_num_frames={frames} is invalid: {error}") from None
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
