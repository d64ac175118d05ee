"""Settings the model accepts but a run cannot use, refused by the CLI before the run writes anything.

Each error names the key as the user types it (``model.init_args.lr``), the value and what is expected.
"""

from __future__ import annotations

from pathlib import Path

# Values of ckpt_path that Lightning resolves itself rather than reading a file.
NAMED_CHECKPOINTS = ("last", "best", "hpc", "registry")


class RunSettingError(ValueError):
    """A setting the run cannot use."""


def check_run_settings(subcommand: str, model, ckpt_path: str | None, untrained: bool = False) -> None:
    """Raise :class:`RunSettingError` for the first setting of ``subcommand`` that cannot work."""
    hp = model.hparams
    key = "model.init_args."
    if subcommand == "fit":
        if "lr" in hp and not hp.lr > 0:
            raise RunSettingError(f"{key}lr={hp.lr} is invalid; expected a learning rate > 0")
        if "warmup_steps" in hp and hp.warmup_steps < 0:
            raise RunSettingError(f"{key}warmup_steps={hp.warmup_steps} is invalid; expected >= 0 (0: no warmup)")
    if "guidance_scale" in hp and hp.guidance_scale < 0:
        raise RunSettingError(f"{key}guidance_scale={hp.guidance_scale} is invalid; expected >= 0 "
                              "(1: no guidance, 0: unconditional)")
    pyramid = getattr(model, "pyramid", None) if subcommand == "predict" else None  # settings predict samples with
    if "sample_steps" in hp and pyramid is not None and hp.sample_steps < pyramid.num_stages:
        raise RunSettingError(f"{key}sample_steps={hp.sample_steps} is invalid; expected at least one step per "
                              f"stage, >= {pyramid.num_stages} (num_stages)")
    frames = hp.get("sample_num_frames")
    if frames is not None and pyramid is not None:
        try:
            pyramid.with_num_frames(model.latent_frames(frames))
        except ValueError as error:
            raise RunSettingError(f"{key}sample_num_frames={frames} is invalid: {error}") from None
    if ckpt_path and str(ckpt_path) not in NAMED_CHECKPOINTS and "://" not in str(ckpt_path) \
            and not Path(str(ckpt_path)).exists():
        raise RunSettingError(f"ckpt_path={ckpt_path}: no such file or folder")
    if subcommand == "predict" and not ckpt_path and not untrained:
        raise RunSettingError("predict needs --ckpt_path (a trained checkpoint); pass --untrained true to sample "
                              "from the untrained network on purpose")


def check_data_settings(subcommand: str, datamodule) -> None:
    """Raise :class:`RunSettingError` when ``fit``/``validate`` would find no shards to read (a root without a
    manifest, a missing split). Roots the data module builds synthetic data into are left to it."""
    if subcommand not in ("fit", "validate") or not hasattr(datamodule, "shard_urls"):
        return
    if getattr(datamodule, "build_synthetic", False) and not datamodule.train_shards and not datamodule.eval_shards:
        return  # prepare_data builds the synthetic data there when it is missing
    try:
        datamodule.shard_urls("train" if subcommand == "fit" else "eval")
    except FileNotFoundError as error:
        raise RunSettingError(f"data.init_args.root={datamodule.root}: {error}") from None
