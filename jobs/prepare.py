"""``deepfill prepare``: turn a tree of images into validated Parquet shards plus a manifest.

    deepfill prepare --src <folder | s3://prefix | list.txt> --dst <folder | s3://prefix>
                     [--shard-size 192MB] [--val-fraction 0.01] [--min-size 256] [--max-pixels N] [--seed 0]

Runs on Ray Data (joins RAY_ADDRESS if set, else starts a local Ray). Rerun the same command after an
interruption: finished shards are kept and the rest are written, without duplicate rows.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from pipeline import storage
from pipeline.config import DEFAULT_MAX_PIXELS, StorageOptions
from pipeline.shards import DEFAULT_SHARD_SIZE, parse_size, prepare

log = logging.getLogger("deepfill.prepare")


@dataclass
class PrepareOptions:
    """Options of ``deepfill prepare`` (each field is also a flag: ``val_fraction`` -> ``--val-fraction``)."""

    src: str  # images: a folder, file:// or s3:// prefix, or a .txt file listing one URI per line
    dst: str  # output folder or s3:// prefix (train/, val/, manifest.json)
    shard_size: str = f"{DEFAULT_SHARD_SIZE // 2**20}MB"  # target encoded bytes per shard: bytes or e.g. 192MB, 64KB
    val_fraction: float = 0.01  # share of images (chosen by a hash of the key) in the val split
    min_size: int = 256  # reject images whose shorter side is below this many pixels
    max_pixels: int = DEFAULT_MAX_PIXELS  # reject headers claiming more pixels than this (decompression bombs)
    seed: int = 0  # seed of the train/val split hash
    endpoint_url: str | None = None  # S3-compatible endpoint (default: AWS_ENDPOINT_URL); keys come from the AWS environment
    region: str | None = None  # S3 region (default: the AWS environment / config)
    progress: bool = True  # a progress bar on a terminal, a line every few seconds in a log

    def __post_init__(self):
        try:
            parse_size(self.shard_size)
        except ValueError as err:
            raise ValueError(f"shard_size: {err}") from None
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.min_size < 0:
            raise ValueError(f"min_size must be >= 0, got {self.min_size}")
        if self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")
        try:
            self.storage_options  # noqa: B018 - validates endpoint_url
        except ValueError as err:
            raise ValueError(f"endpoint_url: {err}") from None

    @property
    def storage_options(self) -> StorageOptions:
        return StorageOptions(endpoint_url=self.endpoint_url, region=self.region)


Options = PrepareOptions  # what `deepfill prepare` reads (jobs.cli)


def run(opts: PrepareOptions) -> int:
    """``deepfill prepare`` once its options are resolved (``jobs.cli``): prints a JSON summary."""
    manifest = prepare(
        opts.src, opts.dst, shard_size_bytes=parse_size(opts.shard_size), val_fraction=opts.val_fraction,
        min_size=opts.min_size, max_pixels=opts.max_pixels, seed=opts.seed, options=opts.storage_options,
        progress=opts.progress,
    )
    summary = {"dst": storage.redact(opts.dst), **manifest["counts"],
               "rejected_by_reason": manifest["rejected_by_reason"]}
    print(json.dumps(summary))
    return 0
