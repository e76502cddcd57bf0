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
