"""Decoding and validating images and masks from encoded bytes.

``decode_image`` is the only way bytes become pixels in this project (prepare, training, inference,
evaluation): it validates the header and the pixels, rejects decompression bombs from the header before any
pixel is decoded, applies the EXIF orientation and converts every mode to RGB uint8:

- grayscale (L, 1, I;16, I) -> replicated to 3 channels; 16-bit and 32-bit integer samples are scaled
  down (``round(v / 257)``), not clipped;
- CMYK (including Adobe's inverted CMYK JPEGs, which PIL un-inverts while decoding) -> PIL's conversion;
- palette (P, PA), with or without transparency -> expanded through the palette;
- anything with alpha (RGBA, LA, PA, palette transparency): the alpha channel is DROPPED and the stored
  colours kept as they are (no compositing onto a background), so no colour data is invented.

Hostile bytes: only the containers in ``FORMATS`` are opened, by content, whatever the file name says
(PIL is never asked to try its other plugins, so none that starts an external program, such as EPS's
Ghostscript, can be reached); files over ``max_bytes`` are refused before anything is parsed; only the
first frame of a multi-frame GIF, TIFF, WebP or MPO is decoded; every JPEG goes through libjpeg-turbo in
strict mode (``simplejpeg``), which turns libjpeg's warnings ("Corrupt JPEG data: ...", "Premature end of
JPEG file") into rejections instead of grey rows; and whatever else a decoder raises on damaged bytes
(struct.error, IndexError, MemoryError, ...) becomes ``ImageRejected("corrupt")``. Plain RGB and grayscale
JPEGs without EXIF rotation are decoded by simplejpeg alone (the fast path: the same libjpeg-turbo pixels as
PIL, without PIL's copies; a test checks the two agree); every other JPEG is checked by it, then decoded by
PIL.

Failures raise ``ImageRejected`` with a short ``reason`` code (see REASONS); ``decode_mask`` prefixes the
image codes with ``mask_`` so a job can tell a bad mask from a bad image. ``encode_png`` is the one way
pixels become bytes again (inference outputs, evaluation grids).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pipeline.config import DEFAULT_MAX_PIXELS

# File name endings (lower case) that the jobs treat as images when they list a folder of inputs.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")

# The containers decoded, as PIL names them (PIL's JPEG opener also returns camera JPEGs with extra pictures,
# format "MPO"). Anything else is "not_an_image".
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")

DEFAULT_MAX_BYTES = 256 * 1024**2  # 256 MiB; larger inputs are rejected ("too_large") before any parsing

REASONS = (
    "empty",  # zero bytes
    "too_large",  # more than max_bytes bytes
    "not_an_image",  # not a JPEG, PNG, WebP, BMP, TIFF or GIF file (by content, whatever the name)
    "truncated",  # the file ends before the pixel data does
    "corrupt",  # the header or pixel stream is damaged (libjpeg warnings included)
    "decompression_bomb",  # the header claims more than max_pixels pixels
    "too_small",  # shorter side below min_size
    "unsupported_mode",  # a pixel format we do not convert
    "mask_empty",  # decode_mask: zero bytes
    "mask_too_large",  # decode_mask: more than max_bytes bytes
    "mask_not_an_image",  # decode_mask: not a JPEG, PNG, WebP, BMP, TIFF or GIF file
    "mask_truncated",  # decode_mask: the file ends before the pixel data does
    "mask_corrupt",  # decode_mask: the header or pixel stream is damaged
    "mask_decompression_bomb",  # decode_mask: the header claims more than max_pixels pixels
    "mask_unsupported_mode",  # decode_mask: a pixel format we do not convert
    "mask_size_mismatch",  # decode_mask: the mask is not the size of its image
)


class ImageRejected(ValueError):
    """Bytes that are not a usable image. ``reason`` is a short code from ``REASONS``."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass(frozen=True)
class ImageInfo:
    """What ``probe_image`` learns: the displayed size (after EXIF orientation) and the container format."""

    height: int
    width: int
    format: str  # PIL's format name: "JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF"


@contextmanager
def _rejecting(stage: str) -> Iterator[None]:
    """Turn anything a decoder raises on hostile bytes into ImageRejected (warnings silenced)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except ImageRejected:
        raise
    except Image.DecompressionBombError as err:
        raise ImageRejected("decompression_bomb", str(err)) from None
    except UnidentifiedImageError:  # none of FORMATS recognised the header (or its opener failed on it)
        raise ImageRejected("not_an_image", "not a JPEG, PNG, WebP, BMP, TIFF or GIF file") from None
    except Exception as err:  # noqa: BLE001 - struct.error, IndexError, MemoryError, cv2.error, KeyError, ...
        text = f"{stage}: {type(err).__name__}: {err}"[:300]
        truncated = isinstance(err, EOFError) or "truncated" in str(err).lower()
        raise ImageRejected("truncated" if truncated else "corrupt", text) from None


def _open_header(data: bytes, max_pixels: int, min_size: int, max_bytes: int) -> Image.Image:
    """Open lazily (header only) and check it: byte cap, format, size, decompression bomb, minimum size."""
    if not data:
        raise ImageRejected("empty", "zero bytes")
    if len(data) > max_bytes:
        raise ImageRejected("too_large", f"{len(data)} bytes is over {max_bytes}")
    with _rejecting("header"):
        img = Image.open(io.BytesIO(data), formats=FORMATS)
        width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageRejected("corrupt", f"header gives size {width}x{height}")
    if width * height > max_pixels:
        raise ImageRejected("decompression_bomb", f"{width}x{height} is over {max_pixels} pixels")
    if min(width, height) < min_size:
        raise ImageRejected("too_small", f"{width}x{height} is below {min_size} px on its short side")
    return img


_EXIF_ORIENTATION = 0x0112


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation, 1 (as stored) to 8; 1 when absent or out of range."""
    value = img.getexif().get(_EXIF_ORIENTATION, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _check_jpeg(data: bytes, header: Image.Image) -> np.ndarray | None:
    """Every JPEG goes through libjpeg-turbo in strict mode: any libjpeg warning rejects the file.

    The common case, an RGB or grayscale JPEG with no EXIF rotation, is the fast path: its (H, W, 3) uint8
    RGB pixels are returned (grayscale replicated to 3 channels, exactly PIL's L -> RGB). None for anything
    else (not a JPEG; CMYK; EXIF-rotated), which PIL decodes afterwards. Raises ImageRejected("truncated")
    for "Premature end of JPEG file", ("corrupt") for the other libjpeg errors and warnings.
    """
    if header.format not in ("JPEG", "MPO"):
        return None
    fast = header.mode in ("RGB", "L") and _orientation(header) == 1
    colorspace = "CMYK" if header.mode == "CMYK" else "RGB"
    try:
        arr = simplejpeg.decode_jpeg(data, colorspace=colorspace, strict=True)
    except ValueError as err:
        text = str(err)
        raise ImageRejected("truncated" if "Premature end of JPEG file" in text else "corrupt", text) from None
    width, height = header.size
    if arr.shape[:2] != (height, width):
        raise ImageRejected("corrupt", f"header says {width}x{height}, libjpeg decoded {arr.shape[1]}x{arr.shape[0]}")
    return arr if fast else None


def _load_validated(img: Image.Image) -> Image.Image:
    """Decode every pixel (first frame only) of an image ``_open_header`` checked and apply EXIF orientation."""
    img.load()
    return ImageOps.exif_transpose(img)


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> (H, W, 3) uint8 RGB, alpha dropped, high bit depths scaled down."""
    mode = img.mode
    if mode == "RGB":
        arr = np.asarray(img)
    elif mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        v = np.asarray(img).astype(np.float64)
        if mode == "I" and v.max(initial=0) > 65535:  # genuinely 32-bit samples: scale by the 32-bit range
            v = v / (2**32 - 1) * 65535.0
        gray = np.clip(np.rint(v / 257.0), 0, 255).astype(np.uint8)  # 65535 -> 255, 257 -> 1
        arr = np.repeat(gray[..., None], 3, axis=-1)
    elif mode == "F":
        v = np.asarray(img).astype(np.float64)
        if not np.isfinite(v).all():
            raise ImageRejected("corrupt", "float samples that are NaN or infinite")
        scale = 255.0 if v.max(initial=0) <= 1.0 else 1.0
        gray = np.clip(np.rint(v * scale), 0, 255).astype(np.uint8)
        arr = np.repeat(gray[..., None], 3, axis=-1)
    elif mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info
        arr = np.asarray(img.convert("RGBA" if has_alpha else "RGB"))[..., :3]
    elif mode in ("RGBA", "RGBa", "RGBX", "LA", "La", "L", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        arr = np.asarray(img.convert("RGB"))
    else:
        try:
            arr = np.asarray(img.convert("RGB"))
        except (ValueError, OSError) as err:
            raise ImageRejected("unsupported_mode", f"mode {mode}: {err}") from None
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageRejected("unsupported_mode", f"mode {mode} gave {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr)


def _decode(data: bytes, max_pixels: int, min_size: int, max_bytes: int) -> tuple[np.ndarray, str]:
    """decode_image, also returning PIL's format name."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone turned truncation tolerance on globally: we still want it off
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; decode_image needs it False")
    header = _open_header(data, max_pixels, min_size, max_bytes)
    with _rejecting("decode"):
        arr = _check_jpeg(data, header)
        if arr is None:
            arr = _to_rgb(_load_validated(header))
        if min(arr.shape[:2]) < min_size:  # cannot differ from the header's, unless the header lied
            raise ImageRejected("too_small", f"{arr.shape[1]}x{arr.shape[0]} is below {min_size} px")
    return arr, str(header.format)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = 0,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Encoded bytes -> (H, W, 3) uint8 RGB, EXIF orientation applied (H, W are the displayed size).

    Raises ImageRejected("empty" | "too_large" | "not_an_image" | "truncated" | "corrupt" |
    "decompression_bomb" | "too_small" | "unsupported_mode") and nothing else for any bytes. Inputs over
    ``max_bytes`` are rejected before parsing, headers claiming more than ``max_pixels`` pixels before any
    pixel is decoded; ``min_size`` is the least allowed short side.
    """
    return _decode(data, max_pixels, min_size, max_bytes)[0]


def probe_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = 0,
                max_bytes: int = DEFAULT_MAX_BYTES) -> ImageInfo:
    """Fully validate ``data`` (as ``decode_image`` does, pixels included) and return its size and format.

    Raises what ``decode_image`` raises.
    """
    arr, fmt = _decode(data, max_pixels, min_size, max_bytes)
    return ImageInfo(height=int(arr.shape[0]), width=int(arr.shape[1]), format=fmt)


def decode_mask(data: bytes, height: int, width: int, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Encoded mask bytes -> (H, W) uint8 in {0, 1}, 1 = hole (white), 0 = known (black).

    Grayscale, RGB (luminance), RGBA/LA (luminance times alpha, so white strokes on a transparent
    background are holes), palette and 16-bit masks are accepted; a pixel is a hole when its value is at
    least half of full scale (>= 128 of 255). A mask with no hole pixels is returned as all zeros. EXIF
    orientation is applied, as for its image.

    Raises ImageRejected with the mask's own codes: ``mask_`` + any decode_image reason ("mask_empty",
    "mask_too_large", "mask_not_an_image", "mask_truncated", "mask_corrupt", "mask_decompression_bomb",
    "mask_unsupported_mode"), or "mask_size_mismatch" when the mask is not ``height x width`` after EXIF
    orientation (a mask whose header gives other sides is refused before any pixel is decoded).
    """
    try:
        return _decode_mask(data, height, width, max_pixels, max_bytes)
    except ImageRejected as err:
        if err.reason.startswith("mask_"):
            raise
        raise ImageRejected("mask_" + err.reason, err.detail) from None


def _decode_mask(data: bytes, height: int, width: int, max_pixels: int, max_bytes: int) -> np.ndarray:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; decode_mask needs it False")
    header = _open_header(data, max_pixels, 0, max_bytes)
    stored = header.size  # EXIF orientation (read with the pixels for PNG) may swap the sides, nothing more
    if sorted(stored) != sorted((width, height)):
        raise ImageRejected("mask_size_mismatch", f"mask is {stored[0]}x{stored[1]}, image is {width}x{height}")
    with _rejecting("decode"):
        _check_jpeg(data, header)
        img = _load_validated(header)
        if img.size != (width, height):
            raise ImageRejected("mask_size_mismatch", f"mask is {img.size[0]}x{img.size[1]}, image is {width}x{height}")
        mode = img.mode
        if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
            gray = _to_rgb(img)[..., 0].astype(np.float32)
        elif mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
            rgba = np.asarray(img.convert("RGBA")).astype(np.float32)
            lum = np.asarray(Image.fromarray(rgba[..., :3].astype(np.uint8)).convert("L")).astype(np.float32)
            gray = lum * rgba[..., 3] / 255.0
        else:
            gray = np.asarray(img.convert("L")).astype(np.float32)
    return (gray >= 127.5).astype(np.uint8)


def encode_png(image: np.ndarray, compression: int = 1) -> bytes:
    """uint8 (H, W, 3) RGB -> PNG bytes through OpenCV (lossless; ``compression`` 0-9, 1 is fast).

    Raises ValueError for any other shape or dtype, an empty image or a compression outside 0-9, and
    ValueError("PNG encoding failed") if OpenCV fails. ``decode_image`` of the result gives back ``image``
    exactly.
    """
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"encode_png wants a uint8 (H, W, 3) RGB array, got {arr.dtype} {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"encode_png got an empty image {arr.shape}")
    if not 0 <= int(compression) <= 9:
        raise ValueError(f"PNG compression must be 0-9, got {compression}")
    try:
        ok, buf = cv2.imencode(".png", np.ascontiguousarray(arr[..., ::-1]),
                               [cv2.IMWRITE_PNG_COMPRESSION, int(compression)])
    except cv2.error as err:
        raise ValueError("PNG encoding failed") from err
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()
