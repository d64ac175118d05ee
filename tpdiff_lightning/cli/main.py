"""The LightningCLI entry point, with the data's clip shape linked into the model."""

from __future__ import annotations

import re
import sys
from argparse import RawDescriptionHelpFormatter
from pathlib import Path
from typing import Optional

import torch
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tpdiff_lightning.callbacks.checkpoint import link_last_checkpoint
from tpdiff_lightning.callbacks.clip_accounting import ClipAccounting
from tpdiff_lightning.callbacks.divergence import DivergenceGuard
from tpdiff_lightning.callbacks.preemption import SIGTERM_EXIT_CODE, PreemptedError, PreemptionCheckpoint
from tpdiff_lightning.callbacks.progress import StepProgressBar
from tpdiff_lightning.cli.errors import TRACEBACK_FLAG, check_config_files, report_and_exit, wants_traceback
from tpdiff_lightning.data.datamodule import VideoDataModule
from tpdiff_lightning.runs.checkpoint_io import install_atomic_checkpoint_io
from tpdiff_lightning.runs.checkpoint_match import check_model_matches_checkpoint
from tpdiff_lightning.runs.resume import (
    UnusableCheckpointError,
    checkpoint_folders,
    find_resume_point,
    load_problem,
    refuse_fresh_fit_over_checkpoints,
    resume_message,
    sharded_checkpoint_file,
)
from tpdiff_lightning.runs.resume_settings import check_resume_settings, resumed_settings_message, setting_changes
from tpdiff_lightning.runs.run_lock import RunFolderLock
from tpdiff_lightning.runs.run_settings import RunSettingError, check_data_settings, check_run_settings
from tpdiff_lightning.runs.tensorboard import log_into_subrun, purge_tensorboard_after, resumed_step
from tpdiff_lightning.training.fit_checks import check_fit_setup
from tpdiff_lightning.training.flat_settings import grouped
from tpdiff_lightning.training.module import TPDiffModule
from tpdiff_lightning.training.settings import INFERENCE_GROUPS, RESUMABLE_GROUPS, settings_help


def replaced_settings_message(ckpt_path: str, replaced: dict[str, tuple]) -> str:
    """Which model settings of the config or command line a checkpoint's hyperparameters replaced."""
    items = "; ".join(f"{key}: {requested!r} -> {stored!r}" for key, (requested, stored) in sorted(replaced.items()))
    return (f"ckpt_path={ckpt_path}: the checkpoint's model settings replace these of the config and command line "
            f"(requested -> used): {items}. The network must match its checkpoint; to train a different model, "
            f"start a new run without ckpt_path. Only the {', '.join(INFERENCE_GROUPS)} settings can change for a "
            "checkpoint.")


def _as_list(value):
    """``[16, 16]`` and ``(16, 16)`` compare equal; so does an int with itself."""
    return list(value) if isinstance(value, (list, tuple)) else value


class HelpFormatter(RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, with descriptions kept as written (the model settings' listing is one per line)."""


class SaveRunConfig(SaveConfigCallback):
    """Saves the run's config as ``config.yaml`` for ``fit`` and as ``config_<subcommand>.yaml`` otherwise, so a
    ``validate`` or ``predict`` on a checkpoint never replaces the record of how the run was trained."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        name = getattr(stage, "value", stage)  # Lightning passes a TrainerFn ("fit", "validate", "predict", ...)
        if name != "fit":
            self.config_filename = f"config_{name}.yaml"
        super().setup(trainer, pl_module, stage)


class TPDiffCLI(LightningCLI):
    """LightningCLI whose model and data are swappable from YAML (``class_path``/``init_args``)."""

    def _parse_ckpt_path(self) -> None:
        # For validate and predict, a checkpoint file's model settings replace the config's, as Lightning does
        # (the network must match its checkpoint), except the sampling settings, which are the user's to choose,
        # and the clip shape, which follows the data. A checkpoint of the flat-settings release is read into the
        # settings groups. A resumed fit keeps the config's settings instead: each difference is applied and said,
        # or refused (tpdiff_lightning.runs.resume_settings), the same for a file and for `--ckpt_path last`.
        subcommand = self.config.get("subcommand")
        if not subcommand or subcommand == "fit" or not self.config[subcommand].get("ckpt_path"):
            return
        ckpt = Path(str(self.config[subcommand].ckpt_path))
        if not ckpt.is_file():  # "last", "best", a sharded folder: the config's settings must build the network
            return
        if (problem := load_problem(ckpt)[1]) is not None:
            raise UnusableCheckpointError(f"ckpt_path={ckpt} {problem}; pass a checkpoint that loads "
                                          "(--ckpt_path last picks the newest one that does)")
        stored = grouped(torch.load(ckpt, map_location="cpu", weights_only=True).get("hyper_parameters") or {})
        stored.pop("_instantiator", None)
        class_path = stored.pop("_class_path", None)
        if not stored:
            return
        model = self.config[subcommand].model
        requested = model.init_args.as_dict()
        kept = (*INFERENCE_GROUPS, "clip")  # the user's sampling; the clip shape is linked from the data
        replacing = {key: value for key, value in stored.items() if key not in kept}
        self.config = self.parser.parse_object(
            {subcommand: {"model": {"class_path": class_path or model.class_path, "init_args": replacing}}},
            self.config)
        replaced = setting_changes({k: v for k, v in requested.items() if k in replacing}, replacing)
        if replaced:
            rank_zero_warn(replaced_settings_message(str(ckpt), replaced))  # (requested, stored) per key
        data = self.config[subcommand].data.init_args
        differ = {key: (value, data.get(key)) for key, value in (stored.get("clip") or {}).items()
                  if _as_list(value) != _as_list(data.get(key))}
        if differ:
            items = "; ".join(f"{key}: trained with {trained!r}, the data gives {given!r}"
                              for key, (trained, given) in differ.items())
            rank_zero_warn(f"ckpt_path={ckpt}: the model takes num_frames and resolution from the data, which "
                           f"differ from the checkpoint's: {items}")

    def before_fit(self) -> None:
        # Settings that cannot train together stop here, before the run writes its config or logs.
        check_fit_setup(self.trainer, self.model, self.datamodule)

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        install_atomic_checkpoint_io(trainer)  # checkpoints are written whole or not at all
        configured = str(self.config.get(self.config.get("subcommand") or "", self.config).get("trainer", {}))
        for i, callback in enumerate(trainer.callbacks):  # Lightning's default bar counts epochs of an endless stream
            if type(callback) in (TQDMProgressBar, RichProgressBar) and "ProgressBar" not in configured:
                trainer.callbacks[i] = StepProgressBar()
        for default in (DivergenceGuard, ClipAccounting, PreemptionCheckpoint):  # every run has them
            if not any(isinstance(callback, default) for callback in trainer.callbacks):
                trainer.callbacks.insert(0, default())  # first: before any ModelCheckpoint
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        self.run_lock = None
        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException:  # a SystemExit(None), which would end the process with status 0
            preemption = next(cb for cb in self.trainer.callbacks if isinstance(cb, PreemptionCheckpoint))
            raise PreemptedError(preemption.message(self.trainer.global_step), preemption.saved) from None
        finally:
            if self.run_lock is not None:
                self.run_lock.release()

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        check_run_settings(subcommand, self.model, kwargs.get("ckpt_path"),
                           untrained=bool(self.config[subcommand].get("untrained")), trainer=self.trainer)
        check_data_settings(subcommand, self.datamodule, self.trainer)
        requeued = getattr(self.trainer._checkpoint_connector, "_hpc_resume_path", None) is not None
        if subcommand == "fit" and not kwargs.get("ckpt_path") and not requeued:
            # Every rank checks (the folder is shared), so no rank goes on to wait for one that stopped here.
            refuse_fresh_fit_over_checkpoints(checkpoint_folders(self.trainer))  # never mix two runs' checkpoints
        resume_point = None
        if kwargs.get("ckpt_path") == "last":
            point = resume_point = find_resume_point(checkpoint_folders(self.trainer))
            if point is None:
                folders = ", ".join(str(f) for f in checkpoint_folders(self.trainer))
                rank_zero_warn(f"ckpt_path=last: no checkpoint in {folders}; starting from step 0")
                kwargs["ckpt_path"] = None
            else:
                if point.reason is not None:
                    rank_zero_warn(resume_message(point))
                kwargs["ckpt_path"] = str(point.path)
        ckpt_file = kwargs.get("ckpt_path") and Path(str(kwargs["ckpt_path"])).is_file()
        if ckpt_file:  # before anything is written: the configured network must be the checkpoint's
            check_model_matches_checkpoint(self.model, self.model.hparams, kwargs["ckpt_path"], INFERENCE_GROUPS,
                                           grouped)
        if subcommand == "fit" and kwargs.get("ckpt_path"):
            self.check_resumed_settings(str(kwargs["ckpt_path"]))
        weights_from = self.config[subcommand].get("weights_from")
        if weights_from:
            self.load_start_weights(subcommand, str(weights_from), kwargs.get("ckpt_path"))
        if subcommand != "fit":
            log_into_subrun(self.trainer, subcommand)  # never into the training run's own curves
        if subcommand == "fit" and ckpt_file:
            purge_tensorboard_after(self.trainer, resumed_step(kwargs["ckpt_path"]))
        elif subcommand == "fit" and kwargs.get("ckpt_path") and Path(str(kwargs["ckpt_path"])).is_dir():
            step, problem = load_problem(Path(str(kwargs["ckpt_path"])))  # a sharded checkpoint folder
            if problem is None:
                purge_tensorboard_after(self.trainer, step)
        if subcommand == "fit" and self.trainer.is_global_zero and self.trainer.log_dir is not None:
            self.run_lock = RunFolderLock(self.trainer.log_dir)  # one run per folder: refuse a second live one
            self.run_lock.acquire()  # the run's first write, after every check above
            if resume_point is not None and resume_point.reason is not None:
                # last.ckpt named a missing, torn or older state: from now on it names the one the run resumes from
                link_last_checkpoint(resume_point.path, resume_point.path.parent / "last.ckpt")
        return kwargs

    def check_resumed_settings(self, ckpt_path: str) -> None:
        """Refuse a resume that changes what the checkpoint trains; say which other settings change."""
        path = Path(ckpt_path)
        state_file = sharded_checkpoint_file(path)[0] if path.is_dir() else path
        if state_file is None or not state_file.is_file():
            return
        checkpoint = torch.load(state_file, map_location="cpu", weights_only=False, mmap=True)
        data_hparams = getattr(self.datamodule, "hparams", None)
        applied = check_resume_settings(ckpt_path, grouped(checkpoint.get("hyper_parameters") or {}),
                                        dict(self.model.hparams), checkpoint.get("datamodule_hyper_parameters"),
                                        dict(data_hparams) if data_hparams is not None else None,
                                        resumable=RESUMABLE_GROUPS, ema_key="optimization.ema_decay")
        if applied:
            rank_zero_warn(resumed_settings_message(ckpt_path, applied))

    def load_start_weights(self, subcommand: str, path: str, ckpt_path: str | None) -> None:
        """``--weights_from``: a new run that starts from a checkpoint's weights (and EMA), at step 0."""
        if subcommand != "fit" or ckpt_path:
            raise RunSettingError(f"weights_from={path} starts a new fit from a checkpoint's weights; expected it "
                                  "with fit and without --ckpt_path (which resumes, or for validate and predict "
                                  "loads, the checkpoint itself)")
        if not Path(path).is_file() or (problem := load_problem(Path(path))[1]) is not None:
            raise RunSettingError(f"weights_from={path} {problem if Path(path).is_file() else 'is no file'}; "
                                  "expected a checkpoint file that loads")
        check_model_matches_checkpoint(self.model, self.model.hparams, path, INFERENCE_GROUPS, grouped)
        self.model.load_weights(path)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--untrained", type=bool, default=False,
                            help="predict: sample from the network without a checkpoint (on purpose)")
        parser.add_argument("--weights_from", type=Optional[str], default=None,
                            help="fit: start a new run (step 0, fresh optimizer) from this checkpoint's weights and "
                                 "EMA, with the settings of the config; e.g. to change the pyramid of a trained model")
        # Links into the clip group: the module saves every group whole, so load_from_checkpoint has them.
        parser.link_arguments("data.init_args.num_frames", "model.init_args.clip.num_frames")
        parser.link_arguments("data.init_args.resolution", "model.init_args.clip.resolution")
        parser.add_argument_group(  # `fit --help` shows the model's settings (subclass mode would hide them)
            "Model settings of TPDiffModule (model.init_args.*; `--model.help TPDiffModule` shows the rest)",
            description=settings_help())


_NESTED_SETTING = re.compile(r"^--(model\.init_args\.[a-z_]+)\.([a-z_]+)$")


def nulls_as_groups(argv: list[str]) -> list[str]:
    """``--model.init_args.optimization.ema_decay=null`` as ``--model.init_args.optimization={ema_decay: null}``,
    which jsonargparse merges into the group the same way: it reads a null given to one field of a settings group
    inside a subclass's ``init_args`` as the string "None" and then refuses it."""
    out, i = [], 0
    while i < len(argv):
        arg = str(argv[i])
        joined = "=" in arg
        key, _, value = arg.partition("=")
        if not joined:
            value = str(argv[i + 1]) if i + 1 < len(argv) else ""
        match = _NESTED_SETTING.match(key)
        if match and value.strip().lower() in ("null", "none"):
            out.append(f"--{match.group(1)}={{{match.group(2)}: null}}")
            i += 1 if joined else 2
            continue
        out.append(argv[i])
        i += 1
    return out


def main(args=None, run: bool = True, parser_kwargs: dict | None = None) -> TPDiffCLI:
    """Run the CLI (``args`` as a list or dict for tests; ``None`` reads ``sys.argv``); errors raise."""
    if isinstance(args, (list, tuple)):
        args = nulls_as_groups(list(args))
    parser_kwargs = {"allow_abbrev": False,  # `--trainer.max_step` must not set max_steps
                     "formatter_class": HelpFormatter, **(parser_kwargs or {})}
    return TPDiffCLI(
        TPDiffModule,
        VideoDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveRunConfig,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        parser_kwargs=parser_kwargs,
    )


def command_line(argv: list[str] | None = None) -> TPDiffCLI:
    """``python lightning_cli.py ...``: like :func:`main`, but an error prints one line and exits non-zero;
    ``--traceback`` (or ``TPDIFF_TRACEBACK=1``) raises it with its full traceback instead."""
    from_sys_argv = argv is None
    argv = list(sys.argv[1:] if from_sys_argv else argv)
    show_traceback = wants_traceback(argv)
    argv = nulls_as_groups([arg for arg in argv if arg != TRACEBACK_FLAG])
    if from_sys_argv:
        sys.argv[1:] = argv  # LightningCLI reads sys.argv itself when given no args
    args = None if from_sys_argv else argv
    try:
        check_config_files(argv)
        return main(args, parser_kwargs={"exit_on_error": False})
    except Exception as error:  # one line for every error; --traceback shows the rest
        if show_traceback:
            raise
        report_and_exit(error, SIGTERM_EXIT_CODE if isinstance(error, PreemptedError) else 1)
