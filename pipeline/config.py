"""Configuration of the data pipeline: where the shards live, how crops and masks are made.

These dataclasses are nested inside the job configs (``data.*`` and ``masks.*`` key paths), so every
field name here is also a ``--set`` override and an MLflow param name. Validation happens in
``__post_init__`` and names the option it rejects.

Secrets never live here: S3 keys come from the standard AWS environment / config files only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000; larger headers are rejected as decompression bombs

MaskKind = Literal[
    "box", "strokes", "mixed", "thin", "medium", "thick",
    "thin_256", "medium_256", "thick_256", "thin_512", "medium_512", "thick_512",
]


def parse_size(text: str | int) -> int:
    """``"200MB"`` / ``"64KiB"`` / ``"1.5G"`` / ``"1048576"`` -> bytes (binary units); ValueError otherwise."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"": 1, "B": 1, "K": 1024, "KB": 1024, "KIB": 1024, "M": 1024**2, "MB": 1024**2, "MIB": 1024**2,
             "G": 1024**3, "GB": 1024**3, "GIB": 1024**3}
    num = s.rstrip("KMGIB")
    unit = s[len(num):]
    try:
        value = int(float(num) * units[unit])
    except (KeyError, ValueError, OverflowError):
        raise ValueError(f"not a size: {text!r} (examples: 200MB, 64KB, 1048576)") from None
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


@dataclass
class StorageOptions:
    """How to reach object storage. Keys are NOT options: they come from the AWS environment / config."""

    endpoint_url: str | None = None  # S3-compatible endpoint (MinIO, Ceph, ...); default: AWS_ENDPOINT_URL or AWS
    region: str | None = None  # default: AWS_DEFAULT_REGION / AWS_REGION / the AWS config
    anon: bool = False  # unsigned requests (public buckets)

    def __post_init__(self):
        if self.endpoint_url is not None and not str(self.endpoint_url).startswith(("http://", "https://")):
            raise ValueError(f"storage.endpoint_url must start with http:// or https://, got {self.endpoint_url!r}")
        if self.endpoint_url is not None and "@" in str(self.endpoint_url):
            raise ValueError("storage.endpoint_url must not carry credentials; use the AWS environment")


@dataclass
class DataConfig:
    """The training data: shards written by ``deepfill prepare`` and how crops are cut from them."""

    shards: str = ""  # URI of a `deepfill prepare` output (folder, file:// or s3://), holding train/ and val/
    crop_size: int = 256  # square training crop, pixels; a multiple of 8
    shuffle_buffer: int = 64  # rows in the trainer's local shuffle buffer (iter_torch_batches)
    color_jitter: float = 0.0  # strength of brightness/contrast/saturation jitter (0 = off; 0.1 is mild)
    flip: bool = True  # random horizontal flip
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb limit when decoding
    val_count: int = 16  # images in the fixed validation set
    batch_rows: int = 16  # rows per output batch of the decode/augment workers
    decode_pool: str = "actors"  # "actors": a standing pool, no idle gap between shards (long jobs);
    #                              "tasks": one Ray task per shard, nothing to start up (short jobs, tests)
    decode_workers: int = 0  # decode actors (1 CPU each); 0 = autoscale from 1 to the free CPUs
    # a training worker that waits this many seconds for its next batch stops with an error naming the
    #    shards (a starved or stuck pipeline); generous, for the first batch of a large job; 0 = wait forever
    stall_timeout_s: float = 600.0
    storage: StorageOptions = field(default_factory=StorageOptions)

    def __post_init__(self):
        if self.crop_size <= 0 or self.crop_size % 8:
            raise ValueError(f"data.crop_size must be a positive multiple of 8, got {self.crop_size}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"data.shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        if not 0.0 <= self.color_jitter <= 0.5:
            raise ValueError(f"data.color_jitter must be in [0, 0.5], got {self.color_jitter}")
        if self.max_pixels <= 0:
            raise ValueError(f"data.max_pixels must be positive, got {self.max_pixels}")
        if self.val_count < 0:
            raise ValueError(f"data.val_count must be >= 0, got {self.val_count}")
        if self.batch_rows <= 0:
            raise ValueError(f"data.batch_rows must be positive, got {self.batch_rows}")
        if self.decode_pool not in ("actors", "tasks"):
            raise ValueError(f"data.decode_pool must be 'actors' or 'tasks', got {self.decode_pool!r}")
        if self.decode_workers < 0:
            raise ValueError(f"data.decode_workers must be >= 0 (0 = autoscale), got {self.decode_workers}")
        if not self.stall_timeout_s >= 0:
            raise ValueError(f"data.stall_timeout_s must be >= 0 (0 = off), got {self.stall_timeout_s}")

    @property
    def decode_cpus(self) -> int:
        """Logical CPUs the decode stage needs to make progress (``build_train_dataset``): one per decode
        actor of a fixed pool, else one (the first autoscaled actor, or one task at a time)."""
        return self.decode_workers if self.decode_pool == "actors" and self.decode_workers else 1


@dataclass
class MaskConfig:
    """Which holes are drawn. Masks are uint8 {0, 1}, 1 = hole, reproducible from (seed, epoch, key)."""

    kind: MaskKind = "mixed"  # box | strokes | mixed (v2: strokes OR box) | LaMa thin/medium/thick[_256|_512]
    seed: int = 0  # base seed of masks and augmentation
    gamma: float = 0.9  # spatial discount: weight = gamma ** (distance to the nearest known pixel) in holes
    max_hole_fraction: float = 0.5  # masks covering more of the image are redrawn

    def __post_init__(self):
        from pipeline.masks import MASK_KINDS

        if self.kind not in MASK_KINDS:
            raise ValueError(f"masks.kind must be one of {list(MASK_KINDS)}, got {self.kind!r}")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"masks.gamma must be in (0, 1], got {self.gamma}")
        if not 0.0 < self.max_hole_fraction <= 1.0:
            raise ValueError(f"masks.max_hole_fraction must be in (0, 1], got {self.max_hole_fraction}")
