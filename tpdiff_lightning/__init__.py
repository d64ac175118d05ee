"""TPDiff: temporal pyramid video diffusion, with a Lightning experiment framework around it."""

__version__ = "0.1.0"
