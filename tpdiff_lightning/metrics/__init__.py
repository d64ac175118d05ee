"""Video quality metrics: the Kinetics-400 I3D feature extractor and FVD."""
