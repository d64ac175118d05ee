"""Build MSR-VTT test shards: `python data/build_msrvtt.py --annotations MSRVTT_data.json --videos videos/ --out data/msrvtt`."""

from tpdiff_lightning.data.msrvtt import main

if __name__ == "__main__":
    main()
