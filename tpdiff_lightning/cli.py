"""The LightningCLI entry point, with the data's clip shape linked into the model."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from tpdiff_lightning.data.datamodule import VideoDataModule
from tpdiff_lightning.module import TPDiffModule


class TPDiffCLI(LightningCLI):
    """LightningCLI whose model and data are swappable from YAML (``class_path``/``init_args``)."""

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
