"""Build OpenVid-1M shards: `python data/build_openvid.py --csv OpenVid-1M.csv --videos videos/ --out data/openvid`."""

from tpdiff_lightning.data.openvid import main

if __name__ == "__main__":
    main()
