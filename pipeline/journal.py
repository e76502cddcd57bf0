"""Run journals merged into one JSON-lines manifest: the record of a job that finishes keys one by one and must
keep what it finished when it is killed.

Layout under a root (a folder or ``s3://`` prefix)::

    <root>/manifest.jsonl               merged rows, one per key, sorted by key, replaced atomically
    <root>/_manifest/<run>.jsonl        local: this run's part, appended and flushed at each ``append``
    <root>/_manifest/<run>.<n>.jsonl    S3 (no appends): one part object per flush (``flush_rows`` / ``flush_s``)

A row is a JSON object with at least ``key`` and ``time`` (ISO 8601 UTC, ``now()``; such times sort as text).
Rule (``latest``, ``merge``): for each key the row with the greatest ``time`` wins; at equal times the one
read last (the manifest, then the parts by name, each in line order). Rows without a time lose to any row
with one. Reading never fails on a damaged line (truncated or garbage JSON, not an object, no key): it is
skipped with a warning. ``NaN`` / ``Infinity`` read as null; rows are written as strict JSON
(``allow_nan=False``).

Concurrency: each run writes only its own part names (``new_run_id()`` is unique), and ``merge`` reads every
part plus the manifest, so two runs on one root never lose each other's rows; merging again gives the same
manifest. ``merge(remove_run=...)`` deletes only that run's parts, after the manifest holding their rows is
in place; other runs' parts stay (a live run may still append to its own) and are merged again next time.

Memory: ``merge`` sorts in chunks of ``chunk_rows`` rows spilled to local temporary files and streams the
merged file to disk, so it holds one chunk at a time; ``latest`` holds one value per key (make it small).
"""

from __future__ import annotations

import datetime as _dt
import heapq
import json
import logging
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from pipeline import storage
from pipeline.config import StorageOptions

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"
PARTS_DIR = "_manifest"


def now() -> str:
    """The current UTC time as ``2026-11-01T12:00:00.123456Z`` (fixed width, so it sorts as text)."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_run_id() -> str:
    """A unique, time-sortable run id without dots or slashes: ``20261101T120000-123456Z-1a2b3c4d``."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S-%fZ") + "-" + secrets.token_hex(4)


def dumps(row: dict) -> str:
    """One row as one line of strict JSON (no NaN: raises ValueError), keys sorted."""
    return json.dumps(row, sort_keys=True, allow_nan=False)


def _loads(line: bytes) -> dict | None:
    """A row from one line, or None when the line is damaged (NaN and Infinity read as null)."""
    try:
        row = json.loads(line.decode("utf-8"), parse_constant=lambda _: None)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(row, dict) or not isinstance(row.get("key"), str):
        return None
    return row


class Journal:
    """This run's part of the journal under ``root``: ``append`` rows as they finish, ``close`` at the end.

    Locally every ``append`` writes and flushes (``os.fsync``) the rows to ``_manifest/<run>.jsonl``. On S3
    rows are buffered and written as one new part object once ``flush_rows`` rows are waiting or ``flush_s``
    seconds have passed since the last part (and at ``flush``/``close``): a kill loses at most that buffer.
    """

    def __init__(self, root: str, run_id: str, options: StorageOptions | None = None, *,
                 flush_rows: int = 1000, flush_s: float = 10.0):
        self.root = root
        self.run_id = run_id
        self.options = options
        self.flush_rows = flush_rows
        self.flush_s = flush_s
        self.rows_written = 0
        self._s3 = storage.is_s3(root)
        self._buffer: list[str] = []
        self._parts = 0
        self._last_flush = time.monotonic()
        self._file = None
        if not self._s3:
            path = storage.filesystem(self._part_uri(), options)[1]
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def _part_uri(self, n: int | None = None) -> str:
        name = f"{self.run_id}.jsonl" if n is None else f"{self.run_id}.{n:06d}.jsonl"
        return storage.join(self.root, PARTS_DIR, name)

    def append(self, rows: Iterable[dict]) -> None:
        """Record finished rows (each with ``key`` and ``time``); strict JSON, raises ValueError on NaN."""
        lines = [dumps(row) + "\n" for row in rows]
        if not lines:
            return
        if self._file is not None:
            self._file.write("".join(lines))
            self._file.flush()
            os.fsync(self._file.fileno())
            self.rows_written += len(lines)
            return
        self._buffer.extend(lines)
        if len(self._buffer) >= self.flush_rows or time.monotonic() - self._last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows now (S3: as one new part object)."""
        if self._buffer:
            storage.write_bytes_atomic(self._part_uri(self._parts), "".join(self._buffer).encode("utf-8"),
                                       self.options)
            self._parts += 1
            self.rows_written += len(self._buffer)
            self._buffer = []
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_journal(root: str, run_id: str | None = None, options: StorageOptions | None = None,
                 **kwargs) -> Journal:
    """Start this run's part under ``root`` (``run_id`` defaults to ``new_run_id()``)."""
    return Journal(root, run_id or new_run_id(), options, **kwargs)


def part_keys(root: str, options: StorageOptions | None = None) -> list[str]:
    """Names of every run's parts under ``<root>/_manifest/``, sorted."""
    return sorted(e.key for e in storage.iter_entries(storage.join(root, PARTS_DIR), options)
                  if e.key.endswith(".jsonl") and "/" not in e.key)


def _read_file(uri: str, options: StorageOptions | None) -> Iterator[dict]:
    fs, path = storage.filesystem(uri, options)
    damaged, first = 0, 0
    try:
        with fs.open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = _loads(line)
                if row is None:
                    damaged += 1
                    first = first or n
                    continue
                yield row
    except FileNotFoundError:  # a part removed by its run's merge while we listed
        return
    if damaged:
        log.warning("%s: skipped %d damaged line(s) (first: line %d)", storage.redact(uri), damaged, first)


def iter_rows(root: str, options: StorageOptions | None = None, *, manifest: bool = True,
              parts: bool = True) -> Iterator[dict]:
    """Every readable row under ``root`` in read order: the merged manifest, then each part by name."""
    if manifest:
        uri = storage.join(root, MANIFEST_NAME)
        if storage.exists(uri, options):
            yield from _read_file(uri, options)
    if parts:
        for name in part_keys(root, options):
            yield from _read_file(storage.join(root, PARTS_DIR, name), options)


def _time(row: dict) -> str:
    t = row.get("time")
    return t if isinstance(t, str) else ""


def latest(root: str, options: StorageOptions | None = None, *, key: Callable[[dict], Any] = lambda r: r["key"],
           value: Callable[[dict], Any] = lambda r: r) -> dict:
    """``{key(row): value(row)}`` of the winning row of each key (greatest time, then read last).

    The parts are read first (their winners held with their times), then the manifest is streamed (its keys
    are unique), so besides the result only the parts' keys carry a time. ``key`` may map a row's key to
    something smaller (a digest), ``value`` should keep only what the caller needs.
    """
    from_parts: dict = {}
    for row in iter_rows(root, options, manifest=False):
        k, t = key(row), _time(row)
        old = from_parts.get(k)
        if old is None or t >= old[0]:
            from_parts[k] = (t, value(row))
    out: dict = {}
    for row in iter_rows(root, options, parts=False):
        k = key(row)
        old = from_parts.get(k)
        if old is not None and old[0] >= _time(row):
            continue  # a part's row is newer (or as new and read later)
        out[k] = value(row)
        if old is not None:
            del from_parts[k]
    for k, (_, v) in from_parts.items():
        out[k] = v
    return out


def _spill(chunk: list[tuple[str, str, int, str]], folder: str) -> str:
    chunk.sort()
    fd, path = tempfile.mkstemp(dir=folder, suffix=".run")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for k, t, seq, line in chunk:
            f.write(json.dumps([k, t, seq]) + "\t" + line + "\n")
    return path


def _read_spill(path: str) -> Iterator[tuple[str, str, int, str]]:
    with open(path, encoding="utf-8") as f:
        for text in f:
            head, line = text.rstrip("\n").split("\t", 1)  # JSON escapes tabs inside strings
            k, t, seq = json.loads(head)
            yield k, t, seq, line


def merge(root: str, options: StorageOptions | None = None, *, remove_run: str | None = None,
          chunk_rows: int = 100_000, count: Callable[[dict], Any] | None = None) -> dict:
    """Rewrite ``<root>/manifest.jsonl`` from the manifest and every part: one row per key (the winner),
    sorted by key, replaced atomically; then delete the parts of ``remove_run`` (if given).

    Returns ``{"rows": n}`` plus, when ``count`` is given, ``{count(row): rows}`` over the winners
    (e.g. ``count=lambda r: r["status"]``). Idempotent: merging again writes the same rows.
    """
    counts: dict = {"rows": 0}
    with tempfile.TemporaryDirectory(prefix="journal-merge-") as tmp:
        spills, chunk = [], []
        for seq, row in enumerate(iter_rows(root, options)):
            chunk.append((row["key"], _time(row), seq, dumps(row)))
            if len(chunk) >= chunk_rows:
                spills.append(_spill(chunk, tmp))
                chunk = []
        if spills:
            spills.append(_spill(chunk, tmp))
            stream = heapq.merge(*(_read_spill(p) for p in spills))
        else:
            chunk.sort()
            stream = iter(chunk)
        out_path = os.path.join(tmp, MANIFEST_NAME)
        with open(out_path, "w", encoding="utf-8") as out:
            prev: tuple | None = None
            for item in stream:  # sorted by (key, time, seq): the last of each key wins
                if prev is not None and item[0] != prev[0]:
                    _emit(out, prev, counts, count)
                prev = item
            if prev is not None:
                _emit(out, prev, counts, count)
        storage.put_file_atomic(out_path, storage.join(root, MANIFEST_NAME), options)
    if remove_run:
        for name in part_keys(root, options):
            if name.startswith(remove_run + "."):
                storage.delete(storage.join(root, PARTS_DIR, name), options)
    return counts


def _emit(out, item: tuple, counts: dict, count: Callable[[dict], Any] | None) -> None:
    out.write(item[3] + "\n")
    counts["rows"] += 1
    if count is not None:
        c = count(json.loads(item[3]))
        counts[c] = counts.get(c, 0) + 1
