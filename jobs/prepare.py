"""``deepfill prepare``: turn a tree of images into validated Parquet shards plus a manifest.

    deepfill prepare --src <folder | s3://prefix | list.txt> --dst <folder | s3://prefix>
                     [--shard-size 192MB] [--val-fraction 0.01] [--min-size 256] [--max-pixels N]
                     [--max-bytes 256MB] [--seed 0]

Runs on Ray Data (joins RAY_ADDRESS if set, else starts a local Ray). Every listed file (hidden ones
included) ends up in one shard or in the manifest's rejected list with a reason.

Reruns into the same ``--dst``: each shard's record holds a fingerprint of its plan (its keys with size
and version, i.e. mtime or ETag, the source URI, val fraction, seed, min size, max pixels and byte cap).
A rerun keeps the shards whose fingerprint is unchanged, rewrites the others and deletes shards no longer
planned, so rerunning after an interruption, with more images, changed files, another ``--src`` or
another ``--val-fraction`` gives what a run into an empty ``--dst`` gives (no key in both splits, no
duplicate rows); the manifest says how many shards were kept, written and removed. A ``.txt`` list's
fingerprint holds the URIs only: files changed in place behind it need a new ``--dst``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from pipeline import storage
from pipeline.config import DEFAULT_MAX_PIXELS, StorageOptions, parse_size
from pipeline.images import DEFAULT_MAX_BYTES
from pipeline.shards import DEFAULT_SHARD_SIZE, prepare

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
    max_bytes: str = f"{DEFAULT_MAX_BYTES // 2**20}MB"  # reject larger files unread (too_large): bytes or e.g. 256MB
    seed: int = 0  # seed of the train/val split hash
    endpoint_url: str | None = None  # S3-compatible endpoint (default: AWS_ENDPOINT_URL); keys come from the AWS environment
    region: str | None = None  # S3 region (default: the AWS environment / config)
    progress: bool = True  # a progress bar on a terminal, a line every few seconds in a log

    def __post_init__(self):
        try:
            parse_size(self.shard_size)
        except ValueError as err:
            raise ValueError(f"shard_size: {err}") from None
        try:
            parse_size(self.max_bytes)
        except ValueError as err:
            raise ValueError(f"max_bytes: {err}") from None
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
        if not self.src.lower().endswith(".txt"):  # a folder: shards written inside it would be listed next time
            how = storage.overlap(self.dst, self.src)
            if how is not None:
                raise ValueError(f"dst (--dst {storage.redact(self.dst)}) {how} src (--src {storage.redact(self.src)}): "
                                 "the shards would be read back as images or written over them; choose a --dst apart from it")

    @property
    def storage_options(self) -> StorageOptions:
        return StorageOptions(endpoint_url=self.endpoint_url, region=self.region)


Options = PrepareOptions  # what `deepfill prepare` reads (jobs.cli)


def run(opts: PrepareOptions) -> int:
    """``deepfill prepare`` once its options are resolved (``jobs.cli``): prints a JSON summary."""
    manifest = prepare(
        opts.src, opts.dst, shard_size_bytes=parse_size(opts.shard_size), val_fraction=opts.val_fraction,
        min_size=opts.min_size, max_pixels=opts.max_pixels, max_bytes=parse_size(opts.max_bytes), seed=opts.seed,
        options=opts.storage_options, progress=opts.progress,
    )
    summary = {"dst": storage.redact(opts.dst), **manifest["counts"],
               "rejected_by_reason": manifest["rejected_by_reason"],
               **{k: manifest[k] for k in ("shards_kept", "shards_written", "shards_removed")}}
    print(json.dumps(summary))
    return 0
