"""Data: webdataset shards of video (or latent) clips, their decoding and streaming pipelines, the DataModule, and
the builders of synthetic, OpenVid-1M and MSR-VTT shards."""
