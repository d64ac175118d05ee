"""The LightningCLI entry point, with the data's clip shape linked into the model."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from tpdiff_lightning.data.datamodule import VideoDataModule
from tpdiff_lightning.module import TPDiffModule


# Sampling settings that a `validate`/`predict` command may change for an existing checkpoint.
INFERENCE_KEYS = ("sample_steps", "guidance_scale", "renoise", "sample_num_frames")


class TPDiffCLI(LightningCLI):
    """LightningCLI whose model and data are swappable from YAML (``class_path``/``init_args``)."""

    def _parse_ckpt_path(self) -> None:
        # Lightning lets a checkpoint's hyperparameters override the whole model config, command line
        # included; the network must match the checkpoint, but sampling settings are the user's to choose.
        subcommand = self.config.get("subcommand")
        if not subcommand or not self.config[subcommand].get("ckpt_path"):
            return super()._parse_ckpt_path()
        init_args = self.config[subcommand].model.init_args
        chosen = {key: init_args.get(key) for key in INFERENCE_KEYS}
        super()._parse_ckpt_path()
        model = self.config[subcommand].model
        for key, value in chosen.items():
            model.init_args[key] = value
            if model.get("dict_kwargs") and key in model.dict_kwargs:
                model.dict_kwargs[key] = value

    def add_arguments_to_parser(self, parser) -> None:
        # Only top-level model arguments are linked: links into nested init_args are lost by load_from_checkpoint.
        parser.link_arguments("data.init_args.num_frames", "model.init_args.num_frames")
        parser.link_arguments("data.init_args.resolution", "model.init_args.resolution")


def main(args=None, run: bool = True) -> TPDiffCLI:
    """Run the CLI (``args`` as a list or dict for tests; ``None`` reads ``sys.argv``)."""
    return TPDiffCLI(
        TPDiffModule,
        VideoDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
