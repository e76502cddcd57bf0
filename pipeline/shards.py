"""``prepare``: a tree of images (folder, bucket prefix or file list) -> validated Parquet shards + manifest.

Layout of the output ``dst``::

    dst/train/part-00000-of-00004.parquet   rows: key (str), image (binary: the original encoded bytes),
    dst/val/part-00000-of-00001.parquet           height, width (int32, displayed size after EXIF), format (str)
    dst/_work/<split>-part-....json        one record per finished shard: its plan's fingerprint, rows,
                                           bytes and every rejected key with its reason
    dst/manifest.json                      written last, atomically: counts, split, shards, every rejected key

How it runs: the driver lists the source (key, size and version of every file, hidden ones included,
streamed) and plans (``plan_shards``, a pure function): every key goes to a split and a shard by hashing
the key (blake2b). Then one Ray Data task per shard reads its files, validates each one fully (header and
pixels, see ``pipeline.images``), writes the shard, then its ``_work`` record. Every listed key ends up
either in exactly one shard or in the manifest's ``rejected`` list with a reason: ``unsafe_key`` (a key
with an empty, ``.`` or ``..`` part, which S3 allows, or a name that is not UTF-8), ``too_large`` (listed
size over ``max_bytes``, never read), ``read_failed`` (with its cause, e.g. a broken link), or a reason of
``pipeline.images``.

The rerun rule: each shard's plan has a fingerprint (blake2b) of everything that decides its content:
its keys with their listed size and version (mtime_ns locally, the ETag on S3), its split and name (which
holds the shard count), the source URI (credentials removed), val fraction, split seed, min size, max
pixels and byte cap. A rerun into the same ``dst`` keeps a shard whose ``_work`` record holds the same
fingerprint (and whose Parquet file exists, when it has rows) and rewrites every other planned shard;
shards and records that are no longer planned are deleted. So a rerun with another ``--src``, more
images, a changed file or another ``--val-fraction`` gives the same shards as a run into an empty ``dst``,
and an interrupted run completes without duplicate rows. A split's shard count is ``ceil(bytes /
shard_size)`` rounded up to a step of a ladder growing by ~9 % (``shard_count``), so a rerun with a few
more images usually keeps the count and rewrites only the shards that gained a key (a new count renames,
so rewrites, every shard of the split). For a ``.txt`` list the fingerprint holds the
URIs but no sizes or versions (the list does not give them; each shard task asks ``fs.info`` per file), so
a file changed in place behind an unchanged list is not noticed: use a new ``dst`` (or delete
``dst/_work``).

Why nothing partial is visible: every file is written in one atomic step (temporary file + rename locally,
one PUT on S3); a shard's record is written after its shard, and a shard to redo loses its record and its
old file before any task runs; the manifest is deleted before anything changes and written last, so a
``dst`` with a manifest holds exactly the shards it lists. Nothing is converted: rows hold the original bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import time
from array import array
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pipeline import storage
from pipeline.config import DEFAULT_MAX_PIXELS, StorageOptions
from pipeline.images import DEFAULT_MAX_BYTES, ImageRejected, probe_image
from pipeline.storage import Entry

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "deepfill-ray/shards/2"
PLAN_FORMAT = "deepfill-ray/shard-plan/1"  # part of every fingerprint: bump it when validation changes
DEFAULT_SHARD_SIZE = 192 * 1024**2  # bytes of encoded images per shard (a target, not a cap)
READ_THREADS = 8  # files of one shard fetched concurrently (S3 round trips overlap)
DETAIL_CHARS = 200  # a rejection's detail (credentials removed) is cut to this length
SPLITS = ("train", "val")


def _schema():
    import pyarrow as pa

    return pa.schema([
        ("key", pa.string()),
        ("image", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("format", pa.string()),
    ])


def _encode_key(key: str) -> bytes:
    """The UTF-8 bytes of a key; a local name that is not UTF-8 keeps its raw bytes (surrogateescape)."""
    return key.encode("utf-8", "surrogateescape")


def _hash128(text: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(text, digest_size=16).digest(), "little")


def _is_val(key_bytes: bytes, val_fraction: float, seed: int) -> bool:
    # == pipeline.masks.stable_seed("split", seed, key) for UTF-8 keys
    return _hash128(b"split\x1f%d\x1f%s" % (int(seed), key_bytes)) / 2.0**128 < val_fraction


def _shard_index(key_bytes: bytes, num_shards: int) -> int:
    return _hash128(b"shard\x1f" + key_bytes) % num_shards  # == stable_seed("shard", key) % num_shards


def split_of(key: str, val_fraction: float, seed: int = 0) -> str:
    """``"val"`` or ``"train"``: a deterministic function of (key, seed), val with probability val_fraction."""
    return "val" if _is_val(_encode_key(key), val_fraction, seed) else "train"


def shard_of(key: str, num_shards: int) -> int:
    """The shard index of ``key`` among ``num_shards`` (deterministic)."""
    return _shard_index(_encode_key(key), num_shards)


def shard_name(index: int, num_shards: int) -> str:
    return f"part-{index:05d}-of-{num_shards:05d}.parquet"


def shard_count(nbytes: int, shard_size_bytes: int) -> int:
    """Shards for ``nbytes`` of images: ``ceil(nbytes / shard_size_bytes)`` (at least 1) rounded up to the
    next step of the ladder ``ceil(2 ** (k / 8))`` (1, 2, 3, ... 9, 10, 11, 12, 14, 15, 16, 18, ...).

    Steps grow by ~9 %, so adding a few percent of images rarely changes the count (which would move
    every key to another shard); shards hold at most ``shard_size_bytes`` on average.
    """
    ideal = max(1, math.ceil(nbytes / shard_size_bytes))
    k = 0
    while (step := math.ceil(round(2 ** (k / 8), 9))) < ideal:
        k += 1
    return step


# ---------------------------------------------------------------------------------------------- planning

@dataclass(frozen=True)
class ShardPlan:
    """One planned shard: which keys it holds and the fingerprint of everything that decides its content."""

    split: str  # "train" or "val"
    name: str  # part-00003-of-00010.parquet
    members: array  # ('I') indices into Plan.keys, in key order
    fingerprint: str  # 32 hex digits; stored in the shard's _work record


@dataclass
class Plan:
    """What ``plan_shards`` returns: compact per-key columns plus the shards that index into them."""

    keys: list[str]  # every listed key, in listing order
    sizes: array  # ('q') listed size of keys[i] in bytes; -1 where the listing could not stat the file
    shards: list[ShardPlan]  # sorted by (split, name); empty shards are not planned
    num_shards: dict[str, int] = field(default_factory=dict)  # split -> shard count (0 for an empty split)
    planned_bytes: dict[str, int] = field(default_factory=dict)  # split -> bytes the shard count came from


def plan_shards(entries: Iterable[Entry], *, shard_size_bytes: int, val_fraction: float, seed: int = 0,
                min_size: int = 256, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES,
                src: str = "", assumed_size: int | None = None) -> Plan:
    """Assign every listed file to a split and a shard and fingerprint each shard's plan. Pure: no I/O, no Ray.

    entries: anything with ``.key`` (str, unique), ``.size`` (int bytes, -1 = unknown) and ``.version``
    (str: mtime_ns, ETag, or the URI for a file list), e.g. ``storage.iter_entries(...)``; consumed once,
    streamed. The split of a key is ``split_of(key, val_fraction, seed)``; a split's shard count is
    ``shard_count(its bytes, shard_size_bytes)``, where files over ``max_bytes`` (rejected unread) and
    unknown sizes count 0, or every file counts ``assumed_size`` when given (a file list). ``min_size``,
    ``max_pixels``, ``max_bytes`` and ``src`` (give it redacted) only enter the fingerprints.

    Memory: no per-key dicts or objects besides the key strings. Kept: the keys (a list), their sizes
    (8 bytes each) and each shard's member indices (4 bytes each); while planning also a 16-byte digest,
    a split flag, a shard index and a sort of the key indices. Measured for 1M synthetic 38-character keys:
    ~105 bytes per key kept, ~180 bytes per key at the peak (tracemalloc), ~13 s. Raises ValueError for a
    repeated key.
    """
    if shard_size_bytes <= 0:
        raise ValueError(f"shard_size_bytes must be positive, got {shard_size_bytes}")
    keys: list[str] = []
    sizes = array("q")
    digests = bytearray()  # 16 bytes per key: blake2b(key, size, version)
    in_val = bytearray()  # 1 byte per key
    split_bytes = [0, 0]
    for entry in entries:
        key, size = entry.key, int(entry.size)
        kb = _encode_key(key)
        keys.append(key)
        sizes.append(size)
        digests += hashlib.blake2b(b"%s\x00%d\x00%s" % (kb, size, _encode_key(str(entry.version))),
                                   digest_size=16).digest()
        v = _is_val(kb, val_fraction, seed)
        in_val.append(v)
        if assumed_size is not None:
            split_bytes[v] += assumed_size
        elif 0 <= size <= max_bytes:
            split_bytes[v] += size

    counts = [in_val.count(0), in_val.count(1)]
    num = [shard_count(split_bytes[v], shard_size_bytes) if counts[v] else 0 for v in (0, 1)]
    shard_ids = array("I", (_shard_index(_encode_key(k), num[v]) for k, v in zip(keys, in_val)))

    order = sorted(range(len(keys)), key=keys.__getitem__)
    buckets: dict[tuple[int, int], array] = {}
    previous = None
    for i in order:
        key = keys[i]
        if key == previous:
            raise ValueError(f"key listed twice: {key!r}")
        previous = key
        group = (in_val[i], shard_ids[i])
        if group not in buckets:
            buckets[group] = array("I")
        buckets[group].append(i)
    del order, shard_ids

    view = memoryview(digests)
    shards = []
    for (v, index) in sorted(buckets):
        split, name = SPLITS[v], shard_name(index, num[v])
        settings = {"format": PLAN_FORMAT, "src": src, "split": split, "shard": name,
                    "val_fraction": float(val_fraction), "seed": int(seed), "min_size": int(min_size),
                    "max_pixels": int(max_pixels), "max_bytes": int(max_bytes)}
        h = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=16)
        members = buckets[(v, index)]
        for i in members:
            h.update(view[16 * i:16 * i + 16])
        shards.append(ShardPlan(split, name, members, h.hexdigest()))
    shards.sort(key=lambda s: (s.split, s.name))
    return Plan(keys, sizes, shards, num_shards=dict(zip(SPLITS, num)),
                planned_bytes=dict(zip(SPLITS, split_bytes)))


# --------------------------------------------------------------------------------------------- sources

@dataclass
class _Source:
    entries: Iterator[Entry]
    root: str  # listing: the URI keys are relative to; "" for a file list
    uris: list[str] | None = None  # file list: the URI of keys[i], in the listing order of ``entries``
    assumed_size: int | None = None  # file list: estimated bytes per file (for the shard count)


def _canonical_src(src: str) -> str:
    if storage.is_s3(src):
        return str(src).rstrip("/")
    return os.path.abspath(os.path.expanduser(str(src).removeprefix("file://")))


def _open_source(src: str, options: StorageOptions | None) -> _Source:
    """A folder or prefix is listed with ``storage.iter_entries`` (hidden names included); a ``.txt`` file is
    a list of URIs (one a line, ``#`` comments; local paths made absolute; keys are the URIs without scheme)."""
    if not str(src).lower().endswith(".txt"):
        root = _canonical_src(src)
        if not storage.is_s3(root) and os.path.isfile(root):
            root = os.path.dirname(root)
        return _Source(storage.iter_entries(src, options, hidden=True), root)
    text = storage.read_bytes(src, options).decode("utf-8")
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        uri = line if storage.is_s3(line) else _canonical_src(line)
        pairs.append((uri.split("://", 1)[1] if "://" in uri else uri.lstrip("/"), uri))
    pairs.sort()
    keys, uris = [], []
    for key, uri in pairs:
        if not keys or keys[-1] != key:  # the same file named twice (or two URIs of one key): first wins
            keys.append(key)
            uris.append(uri)
    del pairs
    # sizes are not listed: estimate them from the first (sorted) 64 files, so the shard count is reproducible
    sizes = []
    for uri in uris[:64]:
        fs, path = storage.filesystem(uri, options)
        try:
            sizes.append(int(fs.size(path) or 0))
        except Exception:  # noqa: BLE001 - a missing file counts 0; its task reports it
            sizes.append(0)
    mean = int(sum(sizes) / max(1, len(sizes)))
    return _Source((Entry(k, 0, u) for k, u in zip(keys, uris)), "", uris, mean)


# ----------------------------------------------------------------------------------------- shard tasks

def _record_name(split: str, name: str) -> str:
    return f"{split}-{name.replace('.parquet', '.json')}"


def _work_record_uri(dst: str, split: str, name: str) -> str:
    return storage.join(dst, "_work", _record_name(split, name))


def _cause(err: BaseException) -> str:
    return storage.redact(f"{type(err).__name__}: {err}")[:DETAIL_CHARS]


def _printable(key: str) -> str:
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def _fetch(fs, path: str, key: str, size: int, *, max_bytes: int, stat: bool) -> tuple[bytes | None, tuple | None]:
    """-> (bytes, None) or (None, (reason, detail)); never raises. ``stat``: the size was not listed, ask."""
    why = storage.unsafe_key(key)
    if why is None and "?versionId=" in path and "s3" in fs.protocol:
        why = "holds '?versionId=', which s3fs reads as a version id"
    if why is None:
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            why = "name is not valid UTF-8"
    if why is not None:
        return None, ("unsafe_key", why)
    try:
        if stat:
            size = int(fs.info(path).get("size") or 0)
        if size > max_bytes:
            return None, ("too_large", f"size {size} bytes is over {max_bytes} (--max-bytes); not read")
        data = fs.cat_file(path)  # one file, no glob expansion (fs.cat(list) would expand [x], * and ?)
    except Exception as err:  # noqa: BLE001 - recorded as this file's rejection
        return None, ("read_failed", _cause(err))
    if len(data) > max_bytes:  # grew after the listing
        return None, ("too_large", f"{len(data)} bytes is over {max_bytes} (--max-bytes)")
    return data, None


def _write_shard(item: dict, *, dst: str, options: StorageOptions | None, min_size: int, max_pixels: int,
                 max_bytes: int) -> dict:
    """Ray Data task: read, validate and write one shard, then its _work record. Returns a summary row.

    item: split, shard, fingerprint, keys (UTF-8 bytes, surrogateescape), sizes (listed; -1 unknown), and
    either root (keys relative to it) or uris (a file list: sizes unknown, asked per file).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    task_log = logging.getLogger(__name__)
    split, name = str(item["split"]), str(item["shard"])
    keys = [bytes(k).decode("utf-8", "surrogateescape") for k in item["keys"]]
    sizes = [int(s) for s in item["sizes"]]
    uris = [str(u) for u in item["uris"]]
    if uris:
        targets = [storage.filesystem(u, options) for u in uris]
    else:
        fs, root = storage.filesystem(str(item["root"]), options)
        targets = [(fs, f"{root}/{k}") for k in keys]

    def fetch(i: int):
        return _fetch(targets[i][0], targets[i][1], keys[i], sizes[i], max_bytes=max_bytes, stat=bool(uris))

    rows = {"key": [], "image": [], "height": [], "width": [], "format": []}
    rejected = []
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        for i, (blob, why) in enumerate(pool.map(fetch, range(len(keys)))):
            if why is None:
                try:
                    info = probe_image(blob, max_pixels=max_pixels, min_size=min_size, max_bytes=max_bytes)
                except ImageRejected as err:
                    why = (err.reason, err.detail)
            if why is not None:
                rejected.append({"key": keys[i], "reason": why[0], "detail": storage.redact(why[1])[:DETAIL_CHARS]})
                continue
            rows["key"].append(keys[i])
            rows["image"].append(blob)
            rows["height"].append(info.height)
            rows["width"].append(info.width)
            rows["format"].append(info.format)
    for r in rejected:
        task_log.warning("rejected %s: %s (%s)", _printable(r["key"]), r["reason"], r["detail"])
    nbytes = sum(len(b) for b in rows["image"])
    shard_uri = storage.join(dst, split, name)
    if rows["key"]:
        order = sorted(range(len(rows["key"])), key=rows["key"].__getitem__)
        table = pa.table({c: [v[i] for i in order] for c, v in rows.items()}, schema=_schema())
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=256, compression="none")  # encoded images don't compress
        storage.write_bytes_atomic(shard_uri, buf.getvalue(), options)
    else:
        storage.delete(shard_uri, options)  # an earlier plan's rows under this name
    record = {"split": split, "shard": name, "fingerprint": str(item["fingerprint"]), "keys": len(keys),
              "rows": len(rows["key"]), "bytes": nbytes, "rejected": rejected}
    storage.write_bytes_atomic(_work_record_uri(dst, split, name), json.dumps(record).encode(), options)
    return {"split": split, "shard": name, "rows": len(rows["key"]), "rejected": len(rejected)}


# ------------------------------------------------------------------------------------------------ driver

def prepare(src: str, dst: str, *, shard_size_bytes: int = DEFAULT_SHARD_SIZE, val_fraction: float = 0.01,
            min_size: int = 256, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES,
            seed: int = 0, options: StorageOptions | None = None, progress: bool = True) -> dict:
    """Turn the images under ``src`` into Parquet shards under ``dst``; return the manifest (also written).

    src: a folder, ``file://`` or ``s3://`` prefix (every file under it, hidden ones included, is a
    candidate), or a ``.txt`` file listing one URI per line. dst: a folder or ``s3://`` prefix.
    ``shard_size_bytes``: target encoded bytes per shard. ``val_fraction``: share of keys (by hash) in the
    val split. ``min_size``: least short side in pixels; ``max_pixels``: decompression-bomb limit;
    ``max_bytes``: files larger than this are rejected (``too_large``) without being read. ``progress``:
    show progress (a bar on a terminal, a line every few seconds in a log, see ``pipeline.progress``).

    Reruns into the same ``dst`` keep the shards whose plan fingerprint is unchanged, rewrite the others
    and delete those no longer planned (the rule is in the module docstring); the manifest's
    ``shards_kept``, ``shards_written`` and ``shards_removed`` say what this run did.
    """
    import ray

    from pipeline.cluster import connect
    from pipeline.progress import Progress

    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_size_bytes <= 0:
        raise ValueError(f"shard_size_bytes must be positive, got {shard_size_bytes}")
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    t0 = time.time()
    source = _open_source(src, options)
    plan = plan_shards(source.entries, shard_size_bytes=shard_size_bytes, val_fraction=val_fraction, seed=seed,
                       min_size=min_size, max_pixels=max_pixels, max_bytes=max_bytes,
                       src=storage.redact(_canonical_src(src)), assumed_size=source.assumed_size)
    if not plan.keys:
        raise FileNotFoundError(f"no files under {storage.redact(src)}")
    log.info("listed %d files (%.1f MB) under %s", len(plan.keys), sum(plan.planned_bytes.values()) / 1e6,
             storage.redact(src))

    # Which planned shards are done (same fingerprint, Parquet present when it has rows); what is stale.
    records = _read_records(dst, options)  # record file name -> record
    present = {split: set(storage.list_files(storage.join(dst, split), (".parquet",), options)) for split in SPLITS}

    def done(shard: ShardPlan) -> bool:
        r = records.get(_record_name(shard.split, shard.name))
        return (r is not None and r.get("fingerprint") == shard.fingerprint
                and (r.get("rows") == 0 or shard.name in present[shard.split]))

    todo = [s for s in plan.shards if not done(s)]
    planned = {(s.split, s.name) for s in plan.shards}
    kept = planned - {(s.split, s.name) for s in todo}
    # Every Parquet file but those of kept shards with rows goes: no longer planned, or about to be redone.
    stale_files = [(split, name) for split in SPLITS for name in sorted(present[split])
                   if (split, name) not in kept or not records[_record_name(split, name)].get("rows")]
    removed = [f"{split}/{name}" for split, name in stale_files if (split, name) not in planned]
    stale_records = sorted(set(records) - {_record_name(split, name) for split, name in kept})
    log.info("%d shards planned: %d kept, %d to write; %d shards of no current plan to remove", len(plan.shards),
             len(kept), len(todo), len(removed))

    # Take the manifest down first, so no reader sees it describe files that are changing; a record goes
    # before its shard is redone, so an interruption never leaves a record next to other content.
    if todo or stale_files or stale_records:
        storage.delete(storage.join(dst, "manifest.json"), options)
    for rel in stale_records:
        storage.delete(storage.join(dst, "_work", rel), options)
    for split, name in stale_files:
        storage.delete(storage.join(dst, split, name), options)
    for name in removed:
        log.warning("removed %s: no longer planned", name)

    if todo:
        connect()
        items = []
        for s in todo:
            items.append({
                "split": s.split, "shard": s.name, "fingerprint": s.fingerprint,
                "keys": [_encode_key(plan.keys[i]) for i in s.members],
                "sizes": [plan.sizes[i] for i in s.members],
                "uris": [source.uris[i] for i in s.members] if source.uris is not None else [],
                "root": source.root,
            })
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map(
            _write_shard,
            fn_kwargs={"dst": dst, "options": options, "min_size": min_size, "max_pixels": max_pixels,
                       "max_bytes": max_bytes},
            num_cpus=1,
        )
        del items
        rejected_so_far = 0
        with Progress("prepare", total=sum(len(s.members) for s in todo), unit="images", enabled=progress) as bar:
            for summary in ds.iter_rows():
                rejected_so_far += int(summary["rejected"])
                bar.set_postfix(f"shard {summary['split']}/{summary['shard']}, {rejected_so_far} rejected")
                bar.update(int(summary["rows"]) + int(summary["rejected"]))

    # The manifest describes exactly the planned shards, each checked against its record.
    records = _read_records(dst, options)
    present = {split: set(storage.list_files(storage.join(dst, split), (".parquet",), options)) for split in SPLITS}
    missing = [f"{s.split}/{s.name}" for s in plan.shards
               if (r := records.get(_record_name(s.split, s.name))) is None or r.get("fingerprint") != s.fingerprint
               or (r["rows"] > 0) != (s.name in present[s.split])]
    if missing:
        raise RuntimeError(f"shards missing after prepare: {missing[:5]}")
    recs = [records[_record_name(s.split, s.name)] for s in plan.shards]
    rejected = sorted((rej for r in recs for rej in r["rejected"]), key=lambda r: r["key"])
    for r in rejected:
        log.warning("rejected %s: %s", _printable(r["key"]), r["reason"])
    counts = {"listed": len(plan.keys), "rejected": len(rejected)}
    for split in SPLITS:
        counts[split] = sum(r["rows"] for r in recs if r["split"] == split)
    if counts["train"] + counts["val"] + counts["rejected"] != counts["listed"]:
        raise RuntimeError(f"prepare lost track of keys: {counts}")
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
        "shards": {split: sorted(r["shard"] for r in recs if r["split"] == split and r["rows"] > 0)
                   for split in SPLITS},
        "shard_rows": {split: {r["shard"]: r["rows"] for r in sorted(recs, key=lambda r: r["shard"])
                               if r["split"] == split and r["rows"] > 0} for split in SPLITS},
        "bytes": {split: sum(r["bytes"] for r in recs if r["split"] == split) for split in SPLITS},
        "options": {"shard_size_bytes": shard_size_bytes, "min_size": min_size, "max_pixels": max_pixels,
                    "max_bytes": max_bytes},
        "rejected": rejected,  # keys exactly as listed; details have credentials removed
        "shards_kept": len(kept),  # this run: planned shards found done and kept
        "shards_written": len(todo),  # this run: planned shards (re)written
        "shards_removed": len(removed),  # this run: Parquet files of no current plan deleted
        "seconds": round(time.time() - t0, 2),
    }
    storage.write_bytes_atomic(storage.join(dst, "manifest.json"), json.dumps(manifest, indent=2).encode(), options)
    log.info("prepare done: %d train, %d val, %d rejected in %.1f s (%d shards kept, %d written)",
             counts["train"], counts["val"], counts["rejected"], manifest["seconds"], manifest["shards_kept"],
             manifest["shards_written"])
    return manifest


def _read_records(dst: str, options: StorageOptions | None) -> dict[str, dict]:
    """``{file name: record}`` of the _work records; an unreadable one reads as ``{}`` (never done)."""
    work = storage.join(dst, "_work")
    out = {}
    for rel in storage.list_files(work, (".json",), options):
        try:
            record = json.loads(storage.read_bytes(storage.join(work, rel), options))
        except (ValueError, OSError):
            record = None
        if not isinstance(record, dict):
            log.warning("ignoring unreadable shard record %s", rel)  # its shard is redone
            record = {}
        out[rel] = record
    return out


def read_manifest(shards: str, options: StorageOptions | None = None) -> dict:
    """The manifest.json of a prepared shard folder."""
    return json.loads(storage.read_bytes(storage.join(shards, "manifest.json"), options))
