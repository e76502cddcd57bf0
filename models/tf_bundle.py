"""Read TensorFlow checkpoints (the "tensor bundle" format) without TensorFlow: numpy and the standard library.

A checkpoint ``<prefix>`` is two kinds of file, written by TF's BundleWriter (tf.train.Saver, tf.train.Checkpoint):

- ``<prefix>.index``: an SSTable in LevelDB's table format. Data blocks of key/value entries (keys sorted,
  prefix-compressed against the previous key: varint32 shared, varint32 non_shared, varint32 value_length,
  key suffix, value; a trailer of uint32 restart offsets and their uint32 count), each block followed by a
  1-byte compression type and a 4-byte masked crc32c of block + type. An index block maps the last key of each
  data block to its BlockHandle (varint64 offset, varint64 size); a metaindex block (empty here). The 48-byte
  footer: the metaindex and index BlockHandles, zero padding to 40 bytes, the magic 0xdb4775248b80fb57 (fixed64
  little-endian). BundleWriter always writes blocks uncompressed (table::kNoCompression, since TF 1.x: "the
  default use of Snappy compression may not be supported on all platforms"); a Snappy-compressed block (type 1)
  is refused with an error rather than decoded.
- The value under key "" is a BundleHeaderProto (num_shards = 1, endianness = 2, version = 3); every other key
  is a tensor's name and its value a BundleEntryProto (dtype = 1, shape = 2 (TensorShapeProto: repeated dim = 2
  {size = 1}, unknown_rank = 3), shard_id = 3, offset = 4, size = 5, crc32c = 6 (fixed32, masked), slices = 7).
  The protobufs are parsed here from the wire format by hand (varints, length-delimited fields, fixed32/64).
- ``<prefix>.data-<shard:05d>-of-<num_shards:05d>``: the raw tensor bytes, each tensor at its entry's offset.

Numeric dtypes are read (float16/32/64, int8..int64, uint8..uint64, bool, complex64/128); strings, bfloat16,
quantized types, resources, variants and partitioned (sliced) variables are refused. Every block's crc32c and,
unless ``verify=False``, every tensor's crc32c is checked (crc32c in numpy, vectorised over lanes: reading and
checking the 43 MB of a DeepFill v1 checkpoint with its critics takes about 0.4 s on one CPU core).

Every format error raises BundleError (a ValueError) naming the file and, where there is one, the key; a missing
file raises FileNotFoundError naming it.
"""

from __future__ import annotations

import functools
import os
import re
import struct

import numpy as np

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48  # 2 BlockHandles padded to 40 bytes + 8-byte magic
BLOCK_TRAILER_SIZE = 5  # compression type (1 byte) + masked crc32c (4 bytes)

# tensorflow/core/framework/types.proto -> numpy (byte order applied from the header).
_DTYPES = {1: "f4", 2: "f8", 3: "i4", 4: "u1", 5: "i2", 6: "i1", 8: "c8", 9: "i8", 10: "b1", 17: "u2",
           18: "c16", 19: "f2", 22: "u4", 23: "u8"}
_DTYPE_NAMES = {7: "string", 11: "qint8", 12: "quint8", 13: "qint32", 14: "bfloat16", 15: "qint16",
                16: "quint16", 20: "resource", 21: "variant"}


class BundleError(ValueError):
    """A TensorFlow checkpoint file that this reader refuses (malformed or unsupported)."""


# ------------------------------------------------------------------------------------------------------------
# Public API


def resolve_prefix(path: str | os.PathLike) -> str:
    """The checkpoint prefix behind `path`: a prefix (``<prefix>.index`` exists), its ``.index`` or
    ``.data-NNNNN-of-NNNNN`` file, or a folder holding a ``checkpoint`` file (its model_checkpoint_path; when
    that is an absolute path from another machine, the same file name in this folder) or exactly one ``.index``
    file.
    Raises FileNotFoundError when `path` is none of these."""
    path = os.fspath(path)
    if path.endswith(".index") and os.path.isfile(path):
        return path[: -len(".index")]
    data = re.match(r"(.+)\.data-\d{5}-of-\d{5}$", path)
    if data and os.path.isfile(data.group(1) + ".index"):
        return data.group(1)
    if os.path.isfile(path + ".index"):
        return path
    if os.path.isdir(path):
        state = os.path.join(path, "checkpoint")
        if os.path.isfile(state):
            with open(state, encoding="utf-8", errors="replace") as fh:
                m = re.search(r'^\s*model_checkpoint_path:\s*"((?:[^"\\]|\\.)*)"', fh.read(), re.M)
            if m:
                name = m.group(1)
                for cand in (os.path.join(path, name), os.path.join(path, os.path.basename(name))):
                    if os.path.isfile(cand + ".index"):
                        return cand
        indexes = sorted(f for f in os.listdir(path) if f.endswith(".index"))
        if len(indexes) == 1:
            return os.path.join(path, indexes[0][: -len(".index")])
        raise FileNotFoundError(f"{path}: no TensorFlow checkpoint here (want a 'checkpoint' file naming one, "
                                f"or exactly one .index file; found {len(indexes)} .index files)")
    raise FileNotFoundError(f"{path}: not a TensorFlow checkpoint prefix ({path}.index does not exist)")


def list_bundle(prefix: str | os.PathLike) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """{tensor name: (numpy dtype, shape)} of the checkpoint at `prefix` (see resolve_prefix), sorted by name.
    Reads only the .index file."""
    prefix = resolve_prefix(prefix)
    header, entries = _read_index(prefix + ".index")
    return {name: (e["dtype"], e["shape"]) for name, e in entries.items()}


def read_bundle(prefix: str | os.PathLike, *, names=None, verify: bool = True) -> dict[str, np.ndarray]:
    """{tensor name: ndarray} of the checkpoint at `prefix` (see resolve_prefix), sorted by name.

    names: read only these tensors (default: all; an unknown name raises KeyError naming it). verify: check
    each tensor's crc32c against the index. Arrays are native-endian copies, writable, in TF's own layout
    (convolution kernels HWIO)."""
    prefix = resolve_prefix(prefix)
    index_path = prefix + ".index"
    header, entries = _read_index(index_path)
    if names is not None:
        names = list(names)
        missing = [n for n in names if n not in entries]
        if missing:
            raise KeyError(f"{index_path}: no tensor {missing[0]!r}")
        entries = {n: entries[n] for n in sorted(names)}
    order = ">" if header["endianness"] == 1 else "<"
    out, files = {}, {}
    try:
        for name, e in entries.items():
            shard = e["shard_id"]
            data_path = f"{prefix}.data-{shard:05d}-of-{header['num_shards']:05d}"
            if shard not in files:
                if not os.path.isfile(data_path):
                    raise FileNotFoundError(f"{data_path}: data file missing (tensor {name!r} is in shard {shard} "
                                            f"of {index_path})")
                files[shard] = open(data_path, "rb")
            fh = files[shard]
            dtype = np.dtype(order + e["dtype"].str[1:]) if e["dtype"].itemsize > 1 else e["dtype"]
            fh.seek(0, os.SEEK_END)
            if e["offset"] + e["size"] > fh.tell():
                raise BundleError(f"{data_path}: tensor {name!r} at bytes [{e['offset']}, {e['offset'] + e['size']})"
                                  f" lies beyond the end of the file ({fh.tell()} bytes)")
            fh.seek(e["offset"])
            raw = fh.read(e["size"])
            if verify and _unmask(e["crc32c"]) != crc32c(raw):
                raise BundleError(f"{data_path}: tensor {name!r}: crc32c mismatch (file corrupt)")
            out[name] = np.frombuffer(raw, dtype).reshape(e["shape"]).astype(e["dtype"].newbyteorder("="))
    finally:
        for fh in files.values():
            fh.close()
    return out


# ------------------------------------------------------------------------------------------------------------
# crc32c (Castagnoli), as TF and LevelDB use it, and its mask


def _make_table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(0x82F63B78), t >> 1).astype(np.uint32)
    return t


_TABLE = _make_table()
_TABLE_LIST = [int(v) for v in _TABLE]
_LANES = 8192  # crc32c of large buffers: this many interleaved lanes, combined afterwards


def _crc_update_scalar(state: int, data: bytes) -> int:
    """Raw CRC register update (no initial or final xor)."""
    t = _TABLE_LIST
    for byte in data:
        state = t[(state ^ byte) & 0xFF] ^ (state >> 8)
    return state


@functools.lru_cache(maxsize=64)
def _zeros_op(n: int) -> np.ndarray:
    """The linear map 'feed n zero bytes' on the CRC register as 4 byte tables (4, 256): the register v maps to
    T[0][v & 255] ^ T[1][(v >> 8) & 255] ^ T[2][(v >> 16) & 255] ^ T[3][v >> 24]."""
    one = _byte_tables(np.array([_crc_update_scalar(1 << i, b"\0") for i in range(32)], np.uint32))
    result = None  # identity
    while n:
        if n & 1:
            result = one if result is None else _byte_tables(_apply(one, _apply(result, _BITS)))
        one = _byte_tables(_apply(one, _apply(one, _BITS)))
        n >>= 1
    return _byte_tables(_BITS) if result is None else result


_BITS = np.array([1 << i for i in range(32)], np.uint32)


def _byte_tables(cols: np.ndarray) -> np.ndarray:
    """A GF(2)-linear map on 32-bit registers given by its 32 columns (images of 1 << i) -> 4 byte tables."""
    b = np.arange(256, dtype=np.uint32)
    tables = np.zeros((4, 256), np.uint32)
    for p in range(4):
        for i in range(8):
            tables[p] ^= np.where((b >> np.uint32(i)) & np.uint32(1), cols[8 * p + i], np.uint32(0))
    return tables


def _apply(tables: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The map of _byte_tables applied to the registers v (uint32 array)."""
    m = np.uint32(0xFF)
    return (tables[0][v & m] ^ tables[1][(v >> np.uint32(8)) & m] ^ tables[2][(v >> np.uint32(16)) & m]
            ^ tables[3][v >> np.uint32(24)])


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """crc32c (Castagnoli, reflected, init and final xor 0xFFFFFFFF) of `data`."""
    n = len(data)
    if n < 4 * _LANES:
        return _crc_update_scalar(0xFFFFFFFF, bytes(data)) ^ 0xFFFFFFFF
    # The register update is linear from the zero register: the initial 0xFFFFFFFF is the same as starting
    # from 0 with the first 4 bytes complemented. Split the data into _LANES chunks of k bytes (zero bytes
    # prepended: from the zero register they change nothing), run all chunks at once, then fold neighbouring
    # chunks pairwise: R(d1 d2) = Z^len(d2) R(d1) ^ R(d2), Z^k the map 'feed k zero bytes'.
    k = -(-n // _LANES)
    buf = np.zeros(_LANES * k, np.uint8)
    buf[_LANES * k - n:] = np.frombuffer(bytes(data), np.uint8)
    buf[_LANES * k - n:_LANES * k - n + 4] ^= np.uint8(0xFF)
    cols = np.ascontiguousarray(buf.reshape(_LANES, k).T).astype(np.uint32)  # (k, lanes): byte j of each lane
    state = np.zeros(_LANES, np.uint32)
    mask = np.uint32(0xFF)
    for j in range(k):
        state = _TABLE[(state ^ cols[j]) & mask] ^ (state >> np.uint32(8))
    length = k
    while state.size > 1:
        if state.size % 2:
            state = np.concatenate([np.zeros(1, np.uint32), state])
        state = _apply(_zeros_op(length), state[0::2]) ^ state[1::2]
        length *= 2
    return int(state[0]) ^ 0xFFFFFFFF


def _unmask(masked: int) -> int:
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


def _mask(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


# ------------------------------------------------------------------------------------------------------------
# Protobuf wire format


def _varint(buf: bytes, pos: int, where: str) -> tuple[int, int]:
    """(value, next position) of the base-128 varint at buf[pos]."""
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise BundleError(f"{where}: truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise BundleError(f"{where}: varint longer than 10 bytes")


def _fields(buf: bytes, where: str) -> list[tuple[int, int, object]]:
    """[(field number, wire type, value)] of a protobuf message; value is an int (varint, fixed32, fixed64)
    or bytes (length-delimited)."""
    out, pos = [], 0
    while pos < len(buf):
        key, pos = _varint(buf, pos, where)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, where)
        elif wire == 1:
            if pos + 8 > len(buf):
                raise BundleError(f"{where}: truncated fixed64 field {field}")
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos, where)
            if pos + n > len(buf):
                raise BundleError(f"{where}: truncated length-delimited field {field}")
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            if pos + 4 > len(buf):
                raise BundleError(f"{where}: truncated fixed32 field {field}")
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        else:
            raise BundleError(f"{where}: unsupported protobuf wire type {wire} (field {field})")
        if field == 0:
            raise BundleError(f"{where}: protobuf field number 0")
        out.append((field, wire, value))
    return out


def _int64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _parse_header(buf: bytes, where: str) -> dict:
    """BundleHeaderProto -> {"num_shards", "endianness" (0 little, 1 big), "producer", "min_consumer"}."""
    header = {"num_shards": 0, "endianness": 0, "producer": 0, "min_consumer": 0}
    for field, wire, value in _fields(buf, where):
        if field == 1 and wire == 0:
            header["num_shards"] = _int64(value)
        elif field == 2 and wire == 0:
            header["endianness"] = value
        elif field == 3 and wire == 2:
            for f2, w2, v2 in _fields(value, where + " (version)"):
                if f2 == 1 and w2 == 0:
                    header["producer"] = _int64(v2)
                elif f2 == 2 and w2 == 0:
                    header["min_consumer"] = _int64(v2)
    if header["num_shards"] < 1:
        raise BundleError(f"{where}: num_shards = {header['num_shards']}")
    if header["endianness"] not in (0, 1):
        raise BundleError(f"{where}: unknown endianness {header['endianness']}")
    if header["min_consumer"] > 1:  # kTensorBundleVersion is 1
        raise BundleError(f"{where}: bundle format version {header['min_consumer']} is newer than this reader (1)")
    return header


def _parse_entry(buf: bytes, where: str) -> dict:
    """BundleEntryProto -> {"dtype": np.dtype, "shape": tuple, "shard_id", "offset", "size", "crc32c"}."""
    e = {"dtype": 0, "shape": (), "shard_id": 0, "offset": 0, "size": 0, "crc32c": 0}
    for field, wire, value in _fields(buf, where):
        if field == 1 and wire == 0:
            e["dtype"] = value
        elif field == 2 and wire == 2:
            dims = []
            for f2, w2, v2 in _fields(value, where + " (shape)"):
                if f2 == 2 and w2 == 2:
                    size = 0
                    for f3, w3, v3 in _fields(v2, where + " (shape dim)"):
                        if f3 == 1 and w3 == 0:
                            size = _int64(v3)
                    dims.append(size)
                elif f2 == 3 and w2 == 0 and v2:
                    raise BundleError(f"{where}: shape of unknown rank")
            if any(d < 0 for d in dims):
                raise BundleError(f"{where}: shape {dims} has an unknown dimension")
            e["shape"] = tuple(dims)
        elif field == 3 and wire == 0:
            e["shard_id"] = _int64(value)
        elif field == 4 and wire == 0:
            e["offset"] = _int64(value)
        elif field == 5 and wire == 0:
            e["size"] = _int64(value)
        elif field == 6 and wire == 5:
            e["crc32c"] = value
        elif field == 7:
            raise BundleError(f"{where}: a partitioned (sliced) variable; not supported")
    code = e["dtype"]
    if code not in _DTYPES:
        what = _DTYPE_NAMES.get(code % 100, f"code {code}")
        raise BundleError(f"{where}: unsupported dtype {what}")
    e["dtype"] = np.dtype(_DTYPES[code])
    expected = int(np.prod(e["shape"], dtype=np.int64)) * e["dtype"].itemsize
    if e["size"] != expected:
        raise BundleError(f"{where}: {e['size']} bytes stored for a {e['dtype']} tensor of shape "
                          f"{list(e['shape'])} ({expected} bytes)")
    if e["offset"] < 0:
        raise BundleError(f"{where}: negative offset {e['offset']}")
    return e


# ------------------------------------------------------------------------------------------------------------
# SSTable (LevelDB table format)


def _read_index(path: str) -> tuple[dict, dict[str, dict]]:
    """(header, {name: entry}) of a bundle's .index file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: index file missing")
    with open(path, "rb") as fh:
        data = fh.read()
    pairs = _table_entries(data, path)
    if not pairs or pairs[0][0] != b"":
        raise BundleError(f"{path}: no header entry (key '') - not a TensorFlow tensor bundle")
    header = _parse_header(pairs[0][1], f"{path}: header")
    entries = {}
    for key, value in pairs[1:]:
        try:
            name = key.decode("utf-8")
        except UnicodeDecodeError:
            raise BundleError(f"{path}: key {key!r} is not UTF-8") from None
        e = _parse_entry(value, f"{path}: tensor {name!r}")
        if not 0 <= e["shard_id"] < header["num_shards"]:
            raise BundleError(f"{path}: tensor {name!r}: shard {e['shard_id']} of {header['num_shards']}")
        entries[name] = e
    return header, entries


def _table_entries(data: bytes, path: str) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of the SSTable `data`, in order."""
    if len(data) < FOOTER_SIZE:
        raise BundleError(f"{path}: {len(data)} bytes, shorter than an SSTable footer ({FOOTER_SIZE}) - truncated?")
    footer = data[-FOOTER_SIZE:]
    if struct.unpack_from("<Q", footer, 40)[0] != TABLE_MAGIC:
        raise BundleError(f"{path}: bad SSTable magic number - truncated or not a TensorFlow .index file")
    where = f"{path}: footer"
    _, pos = _varint(footer, 0, where)  # metaindex handle (offset, size): nothing in it is needed
    _, pos = _varint(footer, pos, where)
    index_off, pos = _varint(footer, pos, where)
    index_size, pos = _varint(footer, pos, where)
    out, last = [], None
    for handle in _block_entries(_block(data, index_off, index_size, path, "index block"), path, "index block"):
        where = f"{path}: index block"
        off, p = _varint(handle[1], 0, where)
        size, _ = _varint(handle[1], p, where)
        for key, value in _block_entries(_block(data, off, size, path, f"data block at {off}"), path,
                                         f"data block at {off}"):
            if last is not None and key <= last:
                raise BundleError(f"{path}: keys out of order ({last!r} then {key!r})")
            out.append((key, value))
            last = key
    return out


def _block(data: bytes, off: int, size: int, path: str, what: str) -> bytes:
    """The contents of the block at [off, off+size), its trailer checked."""
    end = off + size + BLOCK_TRAILER_SIZE
    if end > len(data) - FOOTER_SIZE:
        raise BundleError(f"{path}: {what} [{off}, {end}) runs past the end of the table - truncated?")
    contents, kind = data[off:off + size], data[off + size]
    crc = struct.unpack_from("<I", data, off + size + 1)[0]
    if _unmask(crc) != crc32c(data[off:off + size + 1]):
        raise BundleError(f"{path}: {what}: crc32c mismatch (file corrupt)")
    if kind == 1:
        raise BundleError(f"{path}: {what} is Snappy-compressed; TF's BundleWriter never writes that and this "
                          f"reader does not decode Snappy")
    if kind != 0:
        raise BundleError(f"{path}: {what}: unknown block compression type {kind}")
    return contents


def _block_entries(block: bytes, path: str, what: str) -> list[tuple[bytes, bytes]]:
    """The (key, value) entries of one block (prefix-compressed keys, restart array at the end)."""
    where = f"{path}: {what}"
    if len(block) < 4:
        raise BundleError(f"{where}: shorter than its restart count")
    num_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    limit = len(block) - 4 - 4 * num_restarts
    if num_restarts < 1 or limit < 0:
        raise BundleError(f"{where}: bad restart count {num_restarts}")
    restarts = set(struct.unpack_from(f"<{num_restarts}I", block, limit))
    out, pos, key = [], 0, b""
    while pos < limit:
        start = pos
        shared, pos = _varint(block, pos, where)
        non_shared, pos = _varint(block, pos, where)
        value_len, pos = _varint(block, pos, where)
        if shared > len(key) or (start in restarts and shared):
            raise BundleError(f"{where}: bad key prefix length {shared} after key {key!r}")
        if pos + non_shared + value_len > limit:
            raise BundleError(f"{where}: entry after key {key!r} runs past the block")
        key = key[:shared] + block[pos:pos + non_shared]
        pos += non_shared
        out.append((key, block[pos:pos + value_len]))
        pos += value_len
    return out
