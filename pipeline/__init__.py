"""The data pipeline: storage URIs, image validation, masks, augmentation, Parquet shards, Ray Data datasets.

Submodules are imported explicitly (``from pipeline.masks import generate_mask``); importing ``pipeline``
itself loads nothing heavy (no Ray).
"""
