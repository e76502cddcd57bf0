"""``prepare``: a tree of images (folder, bucket prefix or file list) -> validated Parquet shards + manifest.

Layout of the output ``dst``::

    dst/train/part-00000-of-00004.parquet   rows: key (str), image (binary: the original encoded bytes),
    dst/val/part-00000-of-00001.parquet           height, width (int32, displayed size after EXIF), format (str)
    dst/_work/<split>-part-....json        one record per finished shard (rows, bytes, rejected files)
    dst/manifest.json                      written last, atomically: counts, split, shards, every rejected file

How it runs: the driver lists the source (names and sizes only) and assigns every key to a split and a
shard by hashing the key (blake2b); then one Ray Data task per shard reads its files, validates each one
fully (header and pixels, see ``pipeline.images``), and writes the shard, then its ``_work`` record.

Why it is resumable: the split and the shard of a key depend only on the key, the seed and the number of
shards (fixed by the listing), and every file is written in one atomic step (temporary file + rename
locally, one PUT on S3). A rerun after an interruption skips the shards whose ``_work`` record exists
and redoes the others, so no row is ever written twice; stale shards of a different listing are removed.
Nothing is converted: rows hold the original bytes.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time

from pipeline import storage
from pipeline.config import DEFAULT_MAX_PIXELS, StorageOptions
from pipeline.images import ImageRejected, probe_image
from pipeline.masks import stable_seed

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "deepfill-ray/shards/1"
DEFAULT_SHARD_SIZE = 192 * 1024**2  # bytes of encoded images per shard (a target, not a cap)
READ_GROUP = 32  # files fetched together (s3fs fetches a group concurrently)


def _schema():
    import pyarrow as pa

    return pa.schema([
        ("key", pa.string()),
        ("image", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("format", pa.string()),
    ])


def split_of(key: str, val_fraction: float, seed: int = 0) -> str:
    """``"val"`` or ``"train"``: a deterministic function of (key, seed), val with probability val_fraction."""
    u = stable_seed("split", int(seed), key) / 2.0**128  # uniform in [0, 1)
    return "val" if u < val_fraction else "train"


def shard_of(key: str, num_shards: int) -> int:
    """The shard index of ``key`` among ``num_shards`` (deterministic)."""
    return stable_seed("shard", key) % num_shards


def shard_name(index: int, num_shards: int) -> str:
    return f"part-{index:05d}-of-{num_shards:05d}.parquet"


def parse_size(text: str | int) -> int:
    """``"200MB"`` / ``"64KiB"`` / ``"1.5G"`` / ``"1048576"`` -> bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"": 1, "B": 1, "K": 1024, "KB": 1024, "KIB": 1024, "M": 1024**2, "MB": 1024**2, "MIB": 1024**2,
             "G": 1024**3, "GB": 1024**3, "GIB": 1024**3}
    num = s.rstrip("KMGIB")
    unit = s[len(num):]
    try:
        value = int(float(num) * units[unit])
    except (KeyError, ValueError):
        raise ValueError(f"not a size: {text!r} (examples: 200MB, 64KB, 1048576)") from None
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


def _list_source(src: str, options: StorageOptions | None) -> tuple[dict[str, str], dict[str, int]]:
    """-> ({key: uri}, {key: size}). A ``.txt`` file is a list of URIs (one a line, ``#`` comments)."""
    if src.lower().endswith(".txt"):
        text = storage.read_bytes(src, options).decode("utf-8")
        uris = sorted({line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")})
        keys = {}
        for uri in uris:
            key = uri.split("://", 1)[1] if "://" in uri else uri
            keys[key.lstrip("/")] = uri
        # sizes: estimated from the first (sorted) 64 files, so the shard count is reproducible
        sample = list(keys.items())[:64]
        sizes = []
        for _, uri in sample:
            fs, path = storage.filesystem(uri, options)
            try:
                sizes.append(int(fs.size(path) or 0))
            except (OSError, FileNotFoundError):
                sizes.append(0)
        mean = sum(sizes) / max(1, len(sizes))
        return keys, {k: int(mean) for k in keys}
    sizes = storage.list_sizes(src, options)
    if not sizes:
        raise FileNotFoundError(f"no files under {storage.redact(src)}")
    return {k: storage.join(src, k) for k in sizes}, sizes


def _work_record_uri(dst: str, split: str, name: str) -> str:
    return storage.join(dst, "_work", f"{split}-{name.replace('.parquet', '.json')}")


def _write_shard(item: dict, *, dst: str, options: StorageOptions | None, min_size: int,
                 max_pixels: int) -> dict:
    """Ray Data task: read, validate and write one shard, then its _work record. Returns a summary row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    task_log = logging.getLogger(__name__)
    split, name = str(item["split"]), str(item["shard"])
    keys, uris = list(item["keys"]), list(item["uris"])
    rows = {"key": [], "image": [], "height": [], "width": [], "format": []}
    rejected = []
    for start in range(0, len(keys), READ_GROUP):
        group = list(zip(keys[start:start + READ_GROUP], uris[start:start + READ_GROUP]))
        blobs = _read_group([u for _, u in group], options)
        for (key, _), blob in zip(group, blobs):
            if isinstance(blob, Exception):
                rejected.append({"key": key, "reason": "read_error", "detail": storage.redact(str(blob))[:300]})
                continue
            try:
                info = probe_image(blob, max_pixels=max_pixels, min_size=min_size)
            except ImageRejected as err:
                rejected.append({"key": key, "reason": err.reason, "detail": storage.redact(err.detail)[:300]})
                continue
            rows["key"].append(key)
            rows["image"].append(blob)
            rows["height"].append(info.height)
            rows["width"].append(info.width)
            rows["format"].append(info.format)
    for r in rejected:
        task_log.warning("rejected %s: %s (%s)", r["key"], r["reason"], r["detail"])
    nbytes = sum(len(b) for b in rows["image"])
    if rows["key"]:
        order = sorted(range(len(rows["key"])), key=rows["key"].__getitem__)
        table = pa.table({c: [v[i] for i in order] for c, v in rows.items()}, schema=_schema())
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=256, compression="none")  # encoded images don't compress
        storage.write_bytes_atomic(storage.join(dst, split, name), buf.getvalue(), options)
    record = {"split": split, "shard": name, "rows": len(rows["key"]), "bytes": nbytes, "rejected": rejected}
    storage.write_bytes_atomic(_work_record_uri(dst, split, name), json.dumps(record).encode(), options)
    return {"split": split, "shard": name, "rows": len(rows["key"]), "rejected": len(rejected)}


def _read_group(uris: list[str], options: StorageOptions | None) -> list:
    """Bytes of each URI (or the exception that reading it raised); S3 groups are fetched concurrently."""
    fs, _ = storage.filesystem(uris[0], options)
    paths = [storage.filesystem(u, options)[1] for u in uris]
    try:
        got = fs.cat(paths, on_error="return")
    except Exception:  # fall back to one by one
        got = {}
        for p in paths:
            try:
                got[p] = fs.cat_file(p)
            except Exception as err:  # noqa: BLE001 - recorded as this file's rejection reason
                got[p] = err
    if not isinstance(got, dict):
        got = {paths[0]: got}
    return [got.get(p, FileNotFoundError(p)) for p in paths]


def prepare(src: str, dst: str, *, shard_size_bytes: int = DEFAULT_SHARD_SIZE, val_fraction: float = 0.01,
            min_size: int = 256, max_pixels: int = DEFAULT_MAX_PIXELS, seed: int = 0,
            options: StorageOptions | None = None, progress: bool = True) -> dict:
    """Turn the images under ``src`` into Parquet shards under ``dst``; return the manifest (also written).

    src: a folder, ``file://`` or ``s3://`` prefix (every non-hidden file under it is a candidate), or a
    ``.txt`` file listing one URI per line. dst: a folder or ``s3://`` prefix. ``shard_size_bytes``: target
    encoded bytes per shard. ``val_fraction``: share of keys (by hash) in the val split. ``min_size``: least
    short side in pixels; ``max_pixels``: decompression-bomb limit. ``progress``: show progress (a bar on a
    terminal, a line every few seconds in a log, see ``pipeline.progress``); False shows none. Resumable
    (see the module docstring).
    """
    import ray

    from pipeline.cluster import connect
    from pipeline.progress import Progress

    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_size_bytes <= 0:
        raise ValueError(f"shard_size_bytes must be positive, got {shard_size_bytes}")
    t0 = time.time()
    uris, sizes = _list_source(src, options)
    log.info("listed %d files (%.1f MB) under %s", len(uris), sum(sizes.values()) / 1e6, storage.redact(src))

    # Plan: split and shard of every key, from hashes only.
    by_split: dict[str, list[str]] = {"train": [], "val": []}
    for key in uris:
        by_split[split_of(key, val_fraction, seed)].append(key)
    plan = []  # one item per shard
    expected: dict[str, set[str]] = {}
    for split, keys in by_split.items():
        n = max(1, math.ceil(sum(sizes[k] for k in keys) / shard_size_bytes)) if keys else 0
        buckets: dict[int, list[str]] = {}
        for key in keys:
            buckets.setdefault(shard_of(key, n), []).append(key)
        expected[split] = set()
        for index in sorted(buckets):
            name = shard_name(index, n)
            expected[split].add(name)
            members = sorted(buckets[index])
            plan.append({"split": split, "shard": name, "keys": members, "uris": [uris[k] for k in members]})

    written = {split: set(storage.list_files(storage.join(dst, split), (".parquet",), options)) for split in by_split}
    done = {(r["split"], r["shard"]) for r in _read_records(dst, options)
            if r["rows"] == 0 or r["shard"] in written.get(r["split"], set())}
    todo = [item for item in plan if (item["split"], item["shard"]) not in done]
    log.info("%d shards planned, %d already written, %d to write", len(plan), len(plan) - len(todo), len(todo))

    if todo:
        connect()
        ds = ray.data.from_items(todo, override_num_blocks=len(todo)).map(
            _write_shard,
            fn_kwargs={"dst": dst, "options": options, "min_size": min_size, "max_pixels": max_pixels},
            num_cpus=1,
        )
        rejected_so_far = 0
        with Progress("prepare", total=sum(len(i["keys"]) for i in todo), unit="images", enabled=progress) as bar:
            for summary in ds.iter_rows():
                rejected_so_far += int(summary["rejected"])
                bar.set_postfix(f"shard {summary['split']}/{summary['shard']}, {rejected_so_far} rejected")
                bar.update(int(summary["rows"]) + int(summary["rejected"]))

    # Gather every shard's record (this run's and earlier runs'), drop stale files, write the manifest.
    records = {(r["split"], r["shard"]): r for r in _read_records(dst, options)}
    missing = [f"{i['split']}/{i['shard']}" for i in plan if (i["split"], i["shard"]) not in records]
    if missing:
        raise RuntimeError(f"shards missing after prepare: {missing[:5]}")
    _remove_stale(dst, expected, records, options)
    rejected = []
    for item in plan:
        rejected.extend(records[(item["split"], item["shard"])]["rejected"])
    rejected.sort(key=lambda r: r["key"])
    for r in rejected:
        log.warning("rejected %s: %s", r["key"], r["reason"])
    counts = {"listed": len(uris), "rejected": len(rejected)}
    shards: dict[str, list[str]] = {}
    for split in ("train", "val"):
        recs = [records[(i["split"], i["shard"])] for i in plan if i["split"] == split]
        counts[split] = sum(r["rows"] for r in recs)
        shards[split] = sorted(r["shard"] for r in recs if r["rows"] > 0)
    reasons: dict[str, int] = {}
    for r in rejected:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    manifest = {
        "format": MANIFEST_FORMAT,
        "src": storage.redact(src),
        "counts": counts,
        "rejected_by_reason": dict(sorted(reasons.items())),
        "split": {"val_fraction": val_fraction, "seed": seed,
                  "rule": "val if blake2b('split', seed, key) / 2**128 < val_fraction"},
        "shards": shards,
        "bytes": {split: sum(records[(i["split"], i["shard"])]["bytes"] for i in plan if i["split"] == split)
                  for split in ("train", "val")},
        "options": {"shard_size_bytes": shard_size_bytes, "min_size": min_size, "max_pixels": max_pixels},
        "rejected": rejected,
        "resumed_shards": len(plan) - len(todo),
        "seconds": round(time.time() - t0, 2),
    }
    storage.write_bytes_atomic(storage.join(dst, "manifest.json"),
                               storage.redact(json.dumps(manifest, indent=2)).encode(), options)
    log.info("prepare done: %d train, %d val, %d rejected in %.1f s", counts["train"], counts["val"],
             counts["rejected"], manifest["seconds"])
    return manifest


def _read_records(dst: str, options: StorageOptions | None) -> list[dict]:
    work = storage.join(dst, "_work")
    out = []
    for rel in storage.list_files(work, (".json",), options):
        try:
            out.append(json.loads(storage.read_bytes(storage.join(work, rel), options)))
        except (ValueError, OSError):
            log.warning("ignoring unreadable shard record %s", rel)  # the shard is redone
    return out


def _remove_stale(dst: str, expected: dict[str, set[str]], records: dict, options: StorageOptions | None) -> None:
    """Delete shards and records that belong to no shard of this plan (an earlier, different listing)."""
    for split in ("train", "val"):
        for rel in storage.list_files(storage.join(dst, split), (".parquet",), options):
            if rel not in expected.get(split, set()):
                log.warning("removing stale shard %s/%s from an earlier listing", split, rel)
                storage.delete(storage.join(dst, split, rel), options)
    for (split, name) in records:
        if name not in expected.get(split, set()):
            storage.delete(_work_record_uri(dst, split, name), options)


def read_manifest(shards: str, options: StorageOptions | None = None) -> dict:
    """The manifest.json of a prepared shard folder."""
    return json.loads(storage.read_bytes(storage.join(shards, "manifest.json"), options))
