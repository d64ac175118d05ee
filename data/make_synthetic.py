"""Build the synthetic moving-shape shards: `python data/make_synthetic.py --out data/synthetic`."""

from tpdiff_lightning.data.synthetic import main

if __name__ == "__main__":
    main()
