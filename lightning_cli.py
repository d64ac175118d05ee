"""Command line: ``python lightning_cli.py fit|validate|predict --config configs/default.yaml``."""

from tpdiff_lightning.cli.main import command_line

if __name__ == "__main__":
    command_line()
