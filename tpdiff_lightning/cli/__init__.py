"""The command line: ``python lightning_cli.py fit|validate|predict``, its one-line errors, checkpoint export and
the latent-encoding command."""

from tpdiff_lightning.cli.main import command_line, main

__all__ = ["command_line", "main"]
