"""Encode clips into latent shards; see `python data/encode_latents.py --help`."""

from tpdiff_lightning.cli.encode_latents import main

if __name__ == "__main__":
    main()
