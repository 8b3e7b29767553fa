"""Data: modality normalisation, 3D->2D slicing, nnU-Net datasets, unlabeled pools, shards, samples."""
