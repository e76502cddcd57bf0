"""``deepfill prepare``: turn a tree of images into validated Parquet shards plus a manifest.

    deepfill prepare --src <folder | s3://prefix | list.txt> --dst <folder | s3://prefix>
                     [--shard-size 192MB] [--val-fraction 0.01] [--min-size 256] [--max-pixels N] [--seed 0]

Runs on Ray Data (joins RAY_ADDRESS if set, else starts a local Ray). Rerun the same command after an
interruption: finished shards are kept and the rest are written, without duplicate rows.
"""

from __future__ import annotations

import argparse
import json
import logging

from pipeline import storage
from pipeline.config import DEFAULT_MAX_PIXELS, StorageOptions
from pipeline.shards import DEFAULT_SHARD_SIZE, parse_size, prepare

log = logging.getLogger("deepfill.prepare")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", required=True,
                        help="images: a folder, file:// or s3:// prefix, or a .txt file listing one URI per line")
    parser.add_argument("--dst", required=True, help="output folder or s3:// prefix (train/, val/, manifest.json)")
    parser.add_argument("--shard-size", default=str(DEFAULT_SHARD_SIZE),
                        help="target encoded bytes per shard: a number of bytes or e.g. 192MB, 64KB (default 192MB)")
    parser.add_argument("--val-fraction", type=float, default=0.01,
                        help="share of images (chosen by a hash of the key) in the val split (default 0.01)")
    parser.add_argument("--min-size", type=int, default=256,
                        help="reject images whose shorter side is below this many pixels (default 256)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"reject headers claiming more pixels than this (default {DEFAULT_MAX_PIXELS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split hash (default 0)")
    parser.add_argument("--endpoint-url", default=None,
                        help="S3-compatible endpoint (default: AWS_ENDPOINT_URL); keys come from the AWS environment")
    parser.add_argument("--region", default=None, help="S3 region (default: the AWS environment / config)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        shard_size = parse_size(args.shard_size)
    except ValueError as err:
        raise SystemExit(f"--shard-size: {err}") from None
    if not 0.0 <= args.val_fraction < 1.0:
        raise SystemExit(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.min_size < 0:
        raise SystemExit(f"--min-size must be >= 0, got {args.min_size}")
    if args.max_pixels <= 0:
        raise SystemExit(f"--max-pixels must be positive, got {args.max_pixels}")
    try:
        options = StorageOptions(endpoint_url=args.endpoint_url, region=args.region)
    except ValueError as err:
        raise SystemExit(f"--endpoint-url: {err}") from None
    manifest = prepare(
        args.src, args.dst, shard_size_bytes=shard_size, val_fraction=args.val_fraction, min_size=args.min_size,
        max_pixels=args.max_pixels, seed=args.seed, options=options, progress=not args.no_progress,
    )
    summary = {"dst": storage.redact(args.dst), **manifest["counts"], "rejected_by_reason": manifest["rejected_by_reason"]}
    print(json.dumps(summary))
    return 0
