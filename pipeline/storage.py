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


def list_sizes(uri: str, options: StorageOptions | None = None) -> dict[str, int]:
    """``{relative key: size in bytes}`` for the files under ``uri`` (same rules as ``list_files``)."""
    return dict(sorted((rel, int(info.get("size") or 0)) for rel, info in _walk(uri, options)))
