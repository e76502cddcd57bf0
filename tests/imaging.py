"""Test images: real photos from scikit-image's wheel, and every kind of bad or awkward file a job meets.

Nothing is downloaded: scikit-image ships these photos inside its wheel.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# name in skimage.data -> relative key it is written under (format from the suffix)
GOOD_PHOTOS = {
    "astronaut": "photos/astronaut.jpg",  # 512x512 RGB
    "coffee": "photos/coffee.png",  # 400x600 RGB
    "chelsea": "photos/cat/chelsea.jpg",  # 300x451 RGB
    "rocket": "photos/rocket.webp",  # 427x640 RGB
}


def photo(name: str) -> np.ndarray:
    """An RGB uint8 photo from scikit-image's bundled data."""
    import skimage.data

    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def write_good_images(root: Path) -> dict[str, tuple[int, int]]:
    """Write the good photos under ``root``; returns {key: (height, width)}."""
    out = {}
    for name, key in GOOD_PHOTOS.items():
        arr = photo(name)
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[key.rsplit(".", 1)[1]]
        extra = {"quality": 92} if fmt in ("JPEG", "WEBP") else {}
        path.write_bytes(encode(Image.fromarray(arr), fmt, **extra))
        out[key] = arr.shape[:2]
    return out


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG file whose header claims ``width x height`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# Files that must be accepted and converted to RGB uint8 (kind -> key).
AWKWARD = {
    "grayscale": "awkward/gray.png",
    "cmyk": "awkward/cmyk.jpg",
    "rgba": "awkward/rgba.png",
    "sixteen_bit": "awkward/sixteen.png",
    "palette": "awkward/palette.png",
    "exif_rotated": "awkward/rotated.jpg",
}

# Files that must be rejected (kind -> key).
BAD = {
    "empty": "bad/empty.jpg",
    "not_image": "bad/notes.png",
    "truncated": "bad/truncated.jpg",
    "corrupt": "bad/corrupt.png",
    "bomb": "bad/bomb.png",
}

# An image smaller than a 256 training crop: rejected by `prepare --min-size 256`, fine for inference.
SMALL = {"small": "small/tiny.png"}


def write_bad_images(root: Path) -> dict[str, str]:
    """Write awkward, bad and small files under ``root``; returns {key: kind}.

    Awkward kinds decode to RGB uint8; bad kinds must be rejected with a reason; ``small`` is 40x56.
    """
    base = photo("astronaut")[::2, ::2]  # 256x256 RGB
    rgb = Image.fromarray(base)
    files: dict[str, bytes] = {}

    files[AWKWARD["grayscale"]] = encode(rgb.convert("L"), "PNG")
    files[AWKWARD["cmyk"]] = encode(rgb.convert("CMYK"), "JPEG", quality=90)
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(np.full(base.shape[:2], 128, np.uint8)))
    files[AWKWARD["rgba"]] = encode(rgba, "PNG")
    sixteen = (base[..., 0].astype(np.uint16) * 257).astype(np.uint16)
    files[AWKWARD["sixteen_bit"]] = encode(Image.fromarray(sixteen), "PNG")
    files[AWKWARD["palette"]] = encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64), "PNG")
    # Stored 256 wide x 128 high, EXIF orientation 6 (rotate 90 CW to display): displays 128 wide x 256 high.
    exif = Image.Exif()
    exif[0x0112] = 6
    files[AWKWARD["exif_rotated"]] = encode(Image.fromarray(base[:128]), "JPEG", quality=90, exif=exif.tobytes())

    files[BAD["empty"]] = b""
    files[BAD["not_image"]] = b"these bytes are a shopping list, not an image\n" * 20
    jpeg = encode(rgb, "JPEG", quality=90)
    files[BAD["truncated"]] = jpeg[: len(jpeg) // 2]
    png = bytearray(encode(rgb, "PNG"))
    mid = len(png) // 2
    png[mid : mid + 64] = bytes(64)  # zero out part of the compressed pixel stream
    files[BAD["corrupt"]] = bytes(png)
    files[BAD["bomb"]] = png_bomb()

    files[SMALL["small"]] = encode(Image.fromarray(base[:40, :56]), "PNG")

    kinds = {**{v: k for k, v in AWKWARD.items()}, **{v: k for k, v in BAD.items()}, **{v: k for k, v in SMALL.items()}}
    for key, data in files.items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return {key: kinds[key] for key in files}


def corrupt_scan_jpeg(img: Image.Image, **save_options) -> bytes:
    """A JPEG of ``img`` with restart markers written over the middle of its scan: libjpeg warns "Corrupt
    JPEG data: premature end of data segment" and fills grey, and PIL and OpenCV both accept it."""
    data = bytearray(encode(img, "JPEG", quality=90, **save_options))
    mid = len(data) // 2
    data[mid : mid + 64] = b"\xff\xd0" * 32
    return bytes(data)


def gif_many_frames(frames: int, width: int = 1000, height: int = 1000) -> bytes:
    """An animated GIF of ``frames`` all-black ``width x height`` frames (a few KB each): decoding every
    frame would cost ``frames`` times the pixels its header claims."""
    one = encode(Image.new("P", (width, height), 0), "GIF")
    pos = 13 + (3 << ((one[10] & 7) + 1) if one[10] & 0x80 else 0)  # after the header and global colour table
    while one[pos] == 0x21:  # skip extension blocks: 0x21, label, sub-blocks, 0
        pos += 2
        while one[pos]:
            pos += one[pos] + 1
        pos += 1
    frame = one[pos:-1]  # image descriptor + LZW data, without the trailer
    return one[:pos] + frame * (frames - 1) + one[pos:]


def other_format_files() -> dict[str, bytes]:
    """Real files of formats the project does not accept, {name: bytes}: each must be "not_an_image"."""
    small = Image.fromarray(photo("astronaut")[::16, ::16])  # 32 x 32 RGB
    out = {fmt.lower(): encode(small, fmt) for fmt in ("EPS", "PDF", "ICO", "PPM", "TGA", "PCX", "SGI", "IM", "QOI",
                                                         "DDS")}
    out["xbm"] = encode(small.convert("1"), "XBM")
    out["html"] = b"<!doctype html><html><body><img src='cat.jpg'></body></html>\n"
    out["svg"] = b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'><rect width='10'/></svg>"
    out["ps"] = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"  # would run Ghostscript
    out["zip"] = b"PK\x03\x04" + bytes(60)
    return out


# Hostile inputs beyond BAD (kind -> (key, reason)): other formats under image names, JPEGs PIL accepts but
# libjpeg warns about. Written by write_hostile_images.
HOSTILE = {
    "eps_named_jpg": ("hostile/page.jpg", "not_an_image"),
    "html_named_jpg": ("hostile/index.jpg", "not_an_image"),
    "ppm_named_png": ("hostile/frame.png", "not_an_image"),
    "ico_named_bmp": ("hostile/favicon.bmp", "not_an_image"),
    "tga_named_tif": ("hostile/texture.tif", "not_an_image"),
    "corrupt_scan": ("hostile/grey_rows.jpg", "corrupt"),
    "no_end_marker": ("hostile/cut.jpeg", "truncated"),
}

# Accepted images of extreme shapes (kind -> key): 1 x 20000, 20000 x 1, 1 x 1, a 300-frame GIF.
EXTREME = {
    "tall": "extreme/tall.png",
    "wide": "extreme/wide.gif",
    "dot": "extreme/dot.png",
    "frames": "extreme/frames.gif",
}


def write_hostile_images(root: Path) -> dict[str, str]:
    """Write the HOSTILE and EXTREME files under ``root``; returns {key: kind}."""
    rgb = Image.fromarray(photo("astronaut")[::2, ::2])
    others = other_format_files()
    jpeg = encode(rgb, "JPEG", quality=90)
    ramp = np.tile(np.arange(20000, dtype=np.uint32) % 256, (1, 1)).astype(np.uint8)  # (1, 20000)
    files = {
        HOSTILE["eps_named_jpg"][0]: others["eps"],
        HOSTILE["html_named_jpg"][0]: others["html"],
        HOSTILE["ppm_named_png"][0]: others["ppm"],
        HOSTILE["ico_named_bmp"][0]: others["ico"],
        HOSTILE["tga_named_tif"][0]: others["tga"],
        HOSTILE["corrupt_scan"][0]: corrupt_scan_jpeg(rgb),
        HOSTILE["no_end_marker"][0]: jpeg[:-2],
        EXTREME["tall"]: encode(Image.fromarray(ramp.T.copy()).convert("RGB"), "PNG"),
        EXTREME["wide"]: encode(Image.fromarray(ramp), "GIF"),
        EXTREME["dot"]: encode(Image.new("RGB", (1, 1), (200, 30, 10)), "PNG"),
        EXTREME["frames"]: gif_many_frames(300),
    }
    kinds = {**{key: kind for kind, (key, _) in HOSTILE.items()}, **{key: kind for kind, key in EXTREME.items()}}
    for key, data in files.items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return {key: kinds[key] for key in files}


def copied_photos(photos: Path, dst: Path, copies: int) -> list[str]:
    """The photos under ``photos`` copied ``copies`` times (``dst/copy<i>/...``); returns the keys, sorted."""
    import shutil

    for copy in range(copies):
        for f in sorted(photos.rglob("*.*")):
            target = dst / f"copy{copy}" / f.relative_to(photos)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, target)
    return sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*.*"))


def split_seed(keys: list[str], val_fraction: float, val_count: int) -> int:
    """The first split seed that puts exactly ``val_count`` of ``keys`` in the val split."""
    from pipeline.shards import split_of

    return next(s for s in range(1000) if sum(split_of(k, val_fraction, s) == "val" for k in keys) == val_count)
