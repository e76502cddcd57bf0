"""One way to open any URI: a local path, ``file://...`` or ``s3://bucket/prefix``.

S3 settings come from the standard AWS environment / config (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, ~/.aws/*) or from ``StorageOptions`` (endpoint and region only,
never keys). Credentials are never put into paths, logs or errors: a URI carrying them is refused
(``has_credentials``; the CLI refuses such options before anything runs), and any text or config that
might carry them goes through ``redact`` / ``redact_tree`` before it leaves the process.

Two views of the same storage are offered: an fsspec filesystem (s3fs for S3) for plain file work, and a
pyarrow filesystem for Ray Data (``read_parquet(..., filesystem=...)``) and Ray Train storage.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

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
        endpoint = options.endpoint_url
    else:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    if endpoint:
        check_no_credentials(endpoint, "the S3 endpoint URL")
    return endpoint


def _region(options: StorageOptions | None) -> str | None:
    if options is not None and options.region:
        return options.region
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def filesystem(uri: str, options: StorageOptions | None = None):
    """Return ``(fsspec filesystem, path)`` for ``uri``.

    Local paths and ``file://`` give fsspec's LocalFileSystem and an absolute path; ``s3://bucket/prefix``
    gives an s3fs filesystem (endpoint from options or AWS_ENDPOINT_URL, keys from the AWS environment)
    and ``bucket/prefix``. A URI carrying credentials (``s3://KEY:SECRET@bucket``) is refused.
    """
    check_no_credentials(uri)
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
    The path has no scheme (``bucket/prefix`` for S3, an absolute path locally). A URI carrying
    credentials is refused.
    """
    import pyarrow.fs as pafs

    check_no_credentials(uri)

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

    Local: write a temporary file in the same folder, give it the mode a plainly created file would have
    (``0o666`` less the umask; ``mkstemp`` makes it 0600), then ``os.replace`` it into place. S3: one PUT,
    which S3 makes visible atomically.
    """
    if is_s3(uri):
        fs, path = filesystem(uri, options)
        fs.pipe_file(path, data)
        fs.invalidate_cache(path.rsplit("/", 1)[0])
        return
    _replace_local(_local_path(uri), lambda f: f.write(data))


def put_file_atomic(local_file: str, uri: str, options: StorageOptions | None = None) -> None:
    """Copy a local file to ``uri`` as ``write_bytes_atomic`` writes bytes (streamed, for big files)."""
    if is_s3(uri):
        fs, path = filesystem(uri, options)
        fs.put_file(local_file, path)
        fs.invalidate_cache(path.rsplit("/", 1)[0])
        return

    def copy(f) -> None:
        with open(local_file, "rb") as src:
            while block := src.read(1 << 20):
                f.write(block)

    _replace_local(_local_path(uri), copy)


def _replace_local(path: str, write) -> None:
    """``write(file)`` into a temporary file beside ``path``, fsync it, give it the umask's mode and rename it
    into place; the temporary file is removed on any failure."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    """The process's umask, read without changing it: the ``Umask:`` line of /proc/self/status on Linux.

    Elsewhere it falls back to setting and restoring ``os.umask`` (process-wide: a file another thread
    creates in between gets the 0o077 mode, never a laxer one).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    fs, path = filesystem(uri, options)
    if is_s3(uri):
        fs.invalidate_cache(path)
    return bool(fs.exists(path))


def list_files(uri: str, suffixes: tuple[str, ...] | list[str] | None = None,
               options: StorageOptions | None = None) -> list[str]:
    """Sorted keys (relative to ``uri``, ``/``-separated) of the files under ``uri``, recursively.

    ``suffixes`` (case-insensitive, e.g. ``(".jpg", ".png")``) filters by name ending; hidden files and
    names starting with ``.`` (temporary files of ``write_bytes_atomic``) are left out.
    """
    wanted = tuple(s.lower() for s in suffixes) if suffixes else None
    return sorted(e.key for e in iter_entries(uri, options) if wanted is None or e.key.lower().endswith(wanted))


def delete(uri: str, options: StorageOptions | None = None) -> None:
    """Remove one file (no error if it is missing)."""
    fs, path = filesystem(uri, options)
    if fs.exists(path):
        fs.rm_file(path)


# ----------------------------------------------------------------------------------------- credentials

# Where credentials belong instead of a URI (quoted by every refusal).
CREDENTIALS_HINT = ("credentials belong in the environment: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or ~/.aws "
                    "for S3, MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) for an "
                    "MLflow server")
_SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")
_URI_END = re.compile(r"[\s\"'<>]")
_PORT = re.compile(r"\d{0,5}")


def has_credentials(text: str) -> bool:
    """True when a ``scheme://`` URI in ``text`` carries userinfo: ``s3://KEY:SECRET@bucket``,
    ``https://user@host``, also a password holding an unencoded ``/``, ``?`` or ``#`` (``s3://K:ab/cd@b``).

    ``@`` after the authority (``s3://bucket/a@b.jpg``, ``models:/name@alias``) and ``host:port`` are fine.
    Not caught: a password that starts with up to 5 digits and a ``/`` (it reads as a port).
    """
    text = str(text)
    for match in _SCHEME.finditer(text):
        rest = _URI_END.split(text[match.end():], 1)[0]
        authority = re.split(r"[/?#]", rest, 1)[0]
        if "@" in authority:
            return True
        host = re.sub(r"^\[[^\]]*\]", "", authority)  # an IPv6 literal, [::1]:9000
        if ":" in host and "@" in rest and not _PORT.fullmatch(host.rsplit(":", 1)[1]):
            return True
    return False


def check_no_credentials(uri: str, what: str = "storage URI") -> None:
    """Raise ValueError (without repeating them) when ``uri`` carries credentials (``has_credentials``)."""
    if has_credentials(uri):
        raise ValueError(f"{what} must not carry credentials (user:password@ in the URI); {CREDENTIALS_HINT}")


_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID",
               "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
_NOT_A_PORT = r"(?!\d{0,5}(?:[/?#\s\"'<>]|$))"  # "host:9000/path" is a port, not a password
# scheme://user:password@ (the password may hold '/', '+', '=', ':' and '@': up to the token's last '@')
# or scheme://user@
_URL_USERINFO = re.compile(
    r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)"
    r"(?:[^\s\"'<>/?#@:]*:" + _NOT_A_PORT + r"[^\s\"'<>]*|[^\s\"'<>/?#@:]+)@"
)
# user:password@host without a scheme (what botocore echoes as a bucket name: "KEY:SECRET@bucket"), at the
# start of a token; not "name:/path@x" (models:/name@alias) and not "host:9000/a@b.jpg". A bare "user@host"
# is left alone: it is how e-mail addresses, keys such as "a@b.jpg" and model aliases read.
_BARE_USERINFO = re.compile(
    r"(?<![\w/:.@%+~-])[A-Za-z0-9._~%+-]+:(?!/)" + _NOT_A_PORT + r"[^\s\"'<>]*@(?=[A-Za-z0-9\[])"
)
_AUTHORIZATION = re.compile(r"(?i)(?P<name>\b(?:proxy-)?authorization[\"']?\s*[:=]\s*b?[\"']?)[^\"'\r\n]+")
_BEARER = re.compile(r"(?i)(?P<name>\bbearer\s+)[A-Za-z0-9._~+/=-]{8,}")
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
_KEY_VALUE = re.compile(
    r"(?i)(?P<name>aws_secret_access_key|aws_session_token|secret_access_key|secret_key|secret|session_token|"
    r"password|passwd|token|signature|credential|api[_-]?key)(?P<sep>[\"']?\s*[:=]\s*)"
    r"(?P<quote>[\"'])?(?(quote)[^\"'\r\n]+|[^\s\"',;}&)]+)"
)


def redact(text: str) -> str:
    """``text`` with credentials replaced by ``***``.

    Caught: the values of the AWS key variables and of MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN
    found in the environment (also URL-encoded); userinfo in a ``scheme://`` URI (``user:password@``,
    ``user@``), the password holding ``/``, ``+``, ``=`` or ``:``; ``user:password@host`` without a scheme
    (botocore's ``Invalid bucket name "KEY:SECRET@bucket"``); ``Authorization: ...`` headers and
    ``Bearer`` tokens; ``secret=``, ``password:``, ``token=``, ``X-Amz-Signature=``, ``X-Amz-Credential=``,
    ``X-Amz-Security-Token=``-style pairs (presigned URLs, JSON, YAML); AWS access key ids (``AKIA...``).

    Left alone: ``user@host`` without a scheme or a ``:`` (e-mail addresses, keys such as ``a@b.jpg``,
    ``models:/name@alias``) and ``host:port/path@x``. What cannot be caught: a URI whose password holds a
    ``/`` is split there by s3fs, which echoes only ``"KEY:SECR"`` as the bucket name; that is why such
    URIs are refused before anything runs (``has_credentials``).
    """
    text = str(text)
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            for form in {value, quote(value, safe="")}:
                text = text.replace(form, "***")
    text = _URL_USERINFO.sub(lambda m: m.group("scheme") + "***@", text)
    text = _BARE_USERINFO.sub("***@", text)
    text = _AUTHORIZATION.sub(lambda m: m.group("name") + "***", text)
    text = _BEARER.sub(lambda m: m.group("name") + "***", text)
    text = _AWS_KEY_ID.sub("***", text)
    text = _KEY_VALUE.sub(lambda m: m.group("name") + m.group("sep") + (m.group("quote") or "") + "***", text)
    return text


def redact_tree(obj: Any) -> Any:
    """A copy of ``obj`` (nested dicts, lists and tuples) with every string, keys included, passed through
    ``redact``; other values are kept as they are. Used on every resolved config before it is saved or
    logged (train_state.pt, generator.pt, config.yaml, MLflow params and tags)."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {redact_tree(k): redact_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_tree(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(redact_tree(v) for v in obj)
    return obj


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


def _tree_parts(uri: str) -> tuple[str, ...]:
    """A folder URI as comparable parts: ``("s3", bucket, *prefix)`` or ``("file", *absolute real path)``."""
    uri = str(uri)
    if is_s3(uri):
        return ("s3", *(p for p in uri.split("://", 1)[1].split("/") if p))
    return ("file", *(p for p in os.path.realpath(_local_path(uri)).split(os.sep) if p))


def overlap(output: str, source: str) -> str | None:
    """How folder ``output`` overlaps folder ``source``: "is", "is inside", "contains", or None when they
    are apart (local paths compared after resolving links; s3:// by bucket and prefix parts)."""
    a, b = _tree_parts(output), _tree_parts(source)
    if a == b:
        return "is"
    if a[: len(b)] == b:
        return "is inside"
    if b[: len(a)] == a:
        return "contains"
    return None


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
    if "?versionId=" in key:  # s3fs reads the part after it as an object version: another object
        return "'?versionId=' in the key"
    return None


def list_sizes(uri: str, options: StorageOptions | None = None) -> dict[str, int]:
    """``{relative key: size in bytes}`` for the files under ``uri`` (same rules as ``list_files``)."""
    return dict(sorted((e.key, max(0, e.size)) for e in iter_entries(uri, options)))
