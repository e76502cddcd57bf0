"""One way to open any URI: a local path, ``file://...`` or ``s3://bucket/prefix``.

S3 settings come from the standard AWS environment / config (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, ~/.aws/*) or from ``StorageOptions`` (endpoint and region only,
never keys). Credentials are never put into paths, logs or errors: run any text that might carry them
through ``redact`` before it leaves the process.

Two views of the same storage are offered: an fsspec filesystem (s3fs for S3) for plain file work, and a
pyarrow filesystem for Ray Data (``read_parquet(..., filesystem=...)``) and Ray Train storage.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from pipeline.config import StorageOptions

# botocore >= 1.36 sends CRC checksum headers that several S3-compatible servers reject; ask for the old
# behaviour (checksums only where an operation requires them).
_S3_CONFIG = {"request_checksum_calculation": "when_required", "response_checksum_validation": "when_required"}


def is_s3(uri: str) -> bool:
    return str(uri).startswith(("s3://", "s3a://"))


def _local_path(uri: str) -> str:
    uri = str(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return os.path.abspath(os.path.expanduser(uri))


def _s3_path(uri: str) -> str:
    """``s3://bucket/a/b/`` -> ``bucket/a/b`` (the form s3fs and pyarrow take)."""
    return str(uri).split("://", 1)[1].rstrip("/")


def _endpoint(options: StorageOptions | None) -> str | None:
    if options is not None and options.endpoint_url:
        return options.endpoint_url
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region(options: StorageOptions | None) -> str | None:
    if options is not None and options.region:
        return options.region
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def filesystem(uri: str, options: StorageOptions | None = None):
    """Return ``(fsspec filesystem, path)`` for ``uri``.

    Local paths and ``file://`` give fsspec's LocalFileSystem and an absolute path; ``s3://bucket/prefix``
    gives an s3fs filesystem (endpoint from options or AWS_ENDPOINT_URL, keys from the AWS environment)
    and ``bucket/prefix``.
    """
    if is_s3(uri):
        import s3fs

        client_kwargs = {}
        region = _region(options)
        if region:
            client_kwargs["region_name"] = region
        fs = s3fs.S3FileSystem(
            anon=bool(options.anon) if options is not None else False,
            endpoint_url=_endpoint(options),
            client_kwargs=client_kwargs,
            config_kwargs=dict(_S3_CONFIG),
        )
        return fs, _s3_path(uri)
    if "://" in str(uri) and not str(uri).startswith("file://"):
        raise ValueError(f"unsupported storage URI scheme: {redact(str(uri))!r} (use a path, file:// or s3://)")
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem(), _local_path(uri)


def pyarrow_filesystem(uri: str, options: StorageOptions | None = None):
    """Return ``(pyarrow.fs.FileSystem, path)`` for ``uri``: for Ray Data reads and Ray Train storage.

    pyarrow's S3FileSystem ignores AWS_ENDPOINT_URL, so the endpoint is passed explicitly here.
    The path has no scheme (``bucket/prefix`` for S3, an absolute path locally).
    """
    import pyarrow.fs as pafs

    if is_s3(uri):
        kwargs = {}
        endpoint = _endpoint(options)
        if endpoint:
            parts = urlsplit(endpoint)
            kwargs["endpoint_override"] = parts.netloc + parts.path.rstrip("/")
            kwargs["scheme"] = parts.scheme or "https"
        region = _region(options)
        if region:
            kwargs["region"] = region
        if options is not None and options.anon:
            kwargs["anonymous"] = True
        return pafs.S3FileSystem(**kwargs), _s3_path(uri)
    if "://" in str(uri) and not str(uri).startswith("file://"):
        raise ValueError(f"unsupported storage URI scheme: {redact(str(uri))!r} (use a path, file:// or s3://)")
    return pafs.LocalFileSystem(), _local_path(uri)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with ``/``, keeping its scheme: ``join("s3://b/x/", "train")`` -> ``s3://b/x/train``."""
    out = str(uri).rstrip("/")
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    fs, path = filesystem(uri, options)
    return fs.cat_file(path)


def write_bytes_atomic(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write ``data`` so that readers see either nothing or the whole file.

    Local: write a temporary file in the same folder, then ``os.replace`` it into place. S3: one PUT,
    which S3 makes visible atomically.
    """
    if is_s3(uri):
        fs, path = filesystem(uri, options)
        fs.pipe_file(path, data)
        fs.invalidate_cache(path.rsplit("/", 1)[0])
        return
    path = _local_path(uri)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    fs, path = filesystem(uri, options)
    if is_s3(uri):
        fs.invalidate_cache(path)
    return bool(fs.exists(path))


def _walk(uri: str, options: StorageOptions | None = None) -> Iterator[tuple[str, dict]]:
    """``(relative key, fsspec info dict)`` for every file under ``uri``, recursively, in listing order.

    Keys are relative to ``uri`` and ``/``-separated; hidden files and anything under a name starting with
    ``.`` (the temporary files of ``write_bytes_atomic``) are left out. On S3 the listing cache is dropped
    first, so files written since the last listing are seen. A missing ``uri`` yields nothing.
    """
    fs, root = filesystem(uri, options)
    if is_s3(uri):
        fs.invalidate_cache(root)
    if not fs.exists(root):
        return
    root_prefix = root.rstrip("/") + "/"
    for full, info in fs.find(root, detail=True).items():
        full = str(full)
        rel = full[len(root_prefix):] if full.startswith(root_prefix) else os.path.basename(full)
        if not rel or any(part.startswith(".") for part in rel.split("/")):
            continue
        yield rel, info


def list_files(uri: str, suffixes: tuple[str, ...] | list[str] | None = None,
               options: StorageOptions | None = None) -> list[str]:
    """Sorted keys (relative to ``uri``, ``/``-separated) of the files under ``uri``, recursively.

    ``suffixes`` (case-insensitive, e.g. ``(".jpg", ".png")``) filters by name ending; hidden files and
    names starting with ``.`` (temporary files of ``write_bytes_atomic``) are left out.
    """
    wanted = tuple(s.lower() for s in suffixes) if suffixes else None
    return sorted(rel for rel, _ in _walk(uri, options) if wanted is None or rel.lower().endswith(wanted))


def delete(uri: str, options: StorageOptions | None = None) -> None:
    """Remove one file (no error if it is missing)."""
    fs, path = filesystem(uri, options)
    if fs.exists(path):
        fs.rm_file(path)


_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID")
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_KEY_VALUE = re.compile(
    r"(?i)(?P<name>aws_secret_access_key|aws_session_token|secret_access_key|secret_key|secret|session_token|"
    r"password|token)(?P<sep>[\"']?\s*[:=]\s*[\"']?)(?P<value>[^\s\"',;}&]+)"
)


def redact(text: str) -> str:
    """``text`` with credentials removed: the values of AWS key variables found in the environment,
    ``user:password@`` in URLs, and ``secret=...``-style pairs are replaced by ``***``."""
    text = str(text)
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    text = _URL_USERINFO.sub(lambda m: m.group("scheme") + "***@", text)
    text = _KEY_VALUE.sub(lambda m: m.group("name") + m.group("sep") + "***", text)
    return text


@dataclass(frozen=True, slots=True)
class Entry:
    """One listed file: its key relative to the listed URI, its size and a version string that changes when
    its content may have changed (the ETag on S3, ``mtime_ns`` locally)."""

    key: str
    size: int
    version: str


def iter_entries(uri: str, options: StorageOptions | None = None, *, hidden: bool = False) -> Iterator[Entry]:
    """Every file under ``uri`` as an ``Entry``, recursively, streamed (bounded memory: one S3 page of 1000
    keys, or one local directory, at a time). Order: S3's listing order (keys in byte order) or a sorted walk
    of each local folder; callers that need one order sort the keys.

    ``hidden=False`` leaves out names with a part starting with ``.`` (the temporary files of
    ``write_bytes_atomic``); input listings pass ``hidden=True`` so that no input key vanishes unreported.
    S3 keys are returned as stored, ``.``, ``..`` and empty parts included: check them with ``unsafe_key``.
    A missing ``uri`` yields nothing.
    """
    if is_s3(uri):
        yield from _iter_s3(uri, options, hidden)
        return
    root = _local_path(uri)
    if os.path.isfile(root):
        st = os.stat(root)
        yield Entry(os.path.basename(root), int(st.st_size), str(st.st_mtime_ns))
        return
    if not os.path.isdir(root):
        return
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            with os.scandir(os.path.join(root, rel_dir) if rel_dir else root) as it:
                items = sorted(it, key=lambda e: e.name, reverse=True)
        except OSError:
            continue
        subdirs = []
        for item in reversed(items):
            if not hidden and item.name.startswith("."):
                continue
            rel = f"{rel_dir}/{item.name}" if rel_dir else item.name
            try:
                if item.is_dir(follow_symlinks=False):
                    subdirs.append(rel)
                    continue
                st = item.stat()  # follows links: a broken link raises and is reported with size -1
                yield Entry(rel, int(st.st_size), str(st.st_mtime_ns))
            except OSError:
                yield Entry(rel, -1, "")
        stack.extend(reversed(subdirs))


def _iter_s3(uri: str, options: StorageOptions | None, hidden: bool) -> Iterator[Entry]:
    fs, path = filesystem(uri, options)
    bucket, _, prefix = path.partition("/")
    prefix = prefix + "/" if prefix else ""
    kwargs = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": 1000}
    while True:
        page = fs.call_s3("list_objects_v2", **kwargs)
        for obj in page.get("Contents", ()):
            rel = obj["Key"][len(prefix):]
            if not rel or rel.endswith("/"):  # the prefix itself, or a "folder" marker object
                continue
            if not hidden and any(part.startswith(".") for part in rel.split("/")):
                continue
            yield Entry(rel, int(obj.get("Size") or 0), str(obj.get("ETag", "")).strip('"'))
        if not page.get("IsTruncated"):
            return
        kwargs["ContinuationToken"] = page["NextContinuationToken"]


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def unsafe_key(key: str) -> str | None:
    """Why ``key`` cannot be used as a relative path below a prefix, or None when it can.

    Refused: an empty key, a leading ``/``, an empty part (``a//b``), a ``.`` or ``..`` part (which would
    leave the prefix or alias another key), control characters. Spaces, non-ASCII and glob characters are
    fine: the storage functions here never expand globs.
    """
    if not key:
        return "empty key"
    if key.startswith("/"):
        return "leading '/'"
    parts = key.split("/")
    if any(p == "" for p in parts):
        return "empty part ('//')"
    if any(p in (".", "..") for p in parts):
        return "'.' or '..' part"
    if _CONTROL.search(key):
        return "control character"
    return None


def list_sizes(uri: str, options: StorageOptions | None = None) -> dict[str, int]:
    """``{relative key: size in bytes}`` for the files under ``uri`` (same rules as ``list_files``)."""
    return dict(sorted((rel, int(info.get("size") or 0)) for rel, info in _walk(uri, options)))
