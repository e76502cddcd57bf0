"""``deepfill infer``: inpaint every image under a folder or S3 prefix with a pool of Ray Data model actors.

    deepfill infer --images s3://bucket/photos --output s3://bucket/filled --model models:/deepfill@candidate \\
        (--masks s3://bucket/masks | --mask-preset thick_512 --seed 0) [--batch-size 4] [--num-actors 2] \\
        [--use-gpu] [--max-errors 50] [--max-bytes N] [--max-pixels N] [--overwrite]

How it runs:

1. The driver fetches the generator file once (any ``jobs.serving.fetch_checkpoint`` ref) and hashes it
   (sha256); the bytes travel to the actors through Ray's object store, so workers need no MLflow access.
2. Planning (``plan_entries``, a pure function of the listings): the image keys (every file under
   ``--images`` whose name ends in an image suffix, hidden names included, relative paths such as
   ``a/b/c.jpg``, each with its size and version: mtime_ns locally, the ETag on S3), the masks (paired by
   relative key without the suffix: ``a/b/c.png``, any image suffix, a ``.png`` preferred), the outputs
   already present, and what earlier runs recorded (``Previous``). Each key is skipped, settled as an error
   on the driver, or sent to the actors.
3. Ray Data: a dataset of the keys to do -> ``read_inputs`` tasks fetch the image and mask bytes (one
   object per key, no globbing) -> ``InpaintWorker`` actors (``ActorPoolStrategy(size=--num-actors)``, one
   GPU each with ``--use-gpu``) decode (``pipeline.images``: EXIF orientation, RGB), inpaint each image at
   its own size through ``models.inpaint_uint8`` (images of one size in a batch share a forward pass, up to
   MAX_BATCH_PIXELS), encode PNG and write it to the same relative key under ``--output`` with the suffix
   ``.png`` via ``pipeline.storage.write_bytes_atomic``, so a reader never sees a partial file.
4. Every input key yields one row; bad input never fails a block: it becomes a row with status "error", a
   reason and a detail. The driver journals the rows as batches arrive, logs each error, and stops once the
   errors exceed ``--max-errors`` (exit code 1; outputs already written are complete).

Manifest (``pipeline.journal``): rows are appended to ``<output>/_manifest/<run>.jsonl`` as they finish
(locally flushed per batch; on S3 one part object per 1000 rows or 10 s), and at the end every part and the
previous ``<output>/manifest.jsonl`` are merged into a new ``manifest.jsonl`` (one row per key, sorted,
replaced atomically; per key the row with the latest ``time`` wins), after which this run's parts are
removed. A killed run keeps what it journaled: the next run reads the parts too. Damaged lines are skipped
with a warning. Rows are strict JSON: unknown numbers are null, never NaN. Fields (MANIFEST_FIELDS):

- ``key``, ``output`` (null for an unsafe key), ``status`` ("ok" | "error"), ``reason``, ``detail``
  (the cause of an error, credentials removed, at most DETAIL_CHARS characters), ``hole_fraction``,
  ``seconds``, ``height``, ``width`` (null when unknown), ``run`` (run id), ``time`` (ISO UTC, when the row
  finished);
- provenance: ``input_size``, ``input_version``; ``mask_key``, ``mask_size``, ``mask_version`` (with
  ``--masks``) or ``mask_preset``, ``mask_seed``; ``model_sha256`` (of the generator file bytes, always),
  ``model_name``, ``model_version`` (for ``models:/`` refs, else null), ``model_ref``; ``format``,
  ``pixels_version`` (PIXELS_VERSION, bumped when this code paints other pixels for the same inputs);
- ``fingerprint``: the first 16 hex digits of the sha256 of the fields that decide the pixels: key, output,
  input size and version, mask key/size/version or preset and seed, model sha256, format, pixels_version.
  Not in it: the model's name and version (the same bytes paint the same pixels), ``--max-pixels`` and
  ``--max-bytes`` (they only decide rejection), batch size, actor count and device (floating-point rounding
  only).

Reruns: a key is skipped when its latest row is "ok", its fingerprint equals this run's and its output file
exists, or when its latest row is an error the same bytes would give again (SETTLED_ERRORS: ``corrupt``,
``not_an_image``, ``mask_size_mismatch`` ...) with the same fingerprint and no output; every other key is
redone (a changed input, mask, format or model; an error that may pass next time, such as ``read_failed``,
or that depends on ``--max-pixels`` / ``--max-bytes``; an output that exists without a row, e.g. written by
a run killed before it journaled; a row whose output was deleted). When a
redone key ends in an error, its stale output is deleted, so every PNG left has an "ok" row.
Another model: if the latest "ok" rows under ``--output`` were made by a generator with another sha256, the
run is refused up front (exit code 2, one line naming the model and ``--overwrite``; nothing is written):
a folder holding two models' pixels is the silent failure this prevents. ``--overwrite`` allows it: every
row of the other model is then redone (rows that already match are still skipped).

``--output`` equal to, inside or containing ``--images`` or ``--masks`` is refused (exit code 2): outputs
would be listed as inputs on the next run, or written over inputs (paths compared as absolute real paths,
S3 as bucket/prefix).

Reasons: the ``pipeline.images`` codes (``empty``, ``not_an_image``, ``truncated``, ``corrupt``,
``decompression_bomb``, ``unsupported_mode``, and the mask's codes ``mask_size_mismatch``, ``mask_empty``
...), plus ``unsafe_key`` (``pipeline.storage.unsafe_key`` refuses the key: ``..``, ``//``, control
characters...; nothing is read or written), ``output_collision`` (two inputs map to one output key),
``missing_mask``, ``missing_input`` (gone since the listing), ``too_large`` / ``mask_too_large`` (more than
``--max-bytes``, from the listed size), ``no_hole`` (a mask without hole pixels), ``read_failed`` (a broken
link, listed with size -1, or a failed read), ``inference_failed`` and ``write_failed``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from pipeline.config import DEFAULT_MAX_PIXELS
from pipeline.images import DEFAULT_MAX_BYTES, IMAGE_SUFFIXES

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"
STATUSES = ("ok", "error")
MAX_BATCH_PIXELS = 2048 * 2048  # images of one size share a forward pass up to this many pixels
PIXELS_VERSION = 1  # bump when this code paints other pixels for the same inputs, mask and model
DETAIL_CHARS = 200  # an error's detail is cut to this many characters
TODO_COLUMNS = ("key", "mask_key", "out_key", "input_size", "input_version", "mask_size", "mask_version",
                "fingerprint", "stale")
MANIFEST_FIELDS = ("key", "output", "status", "reason", "detail", "hole_fraction", "seconds", "height", "width",
                   "run", "time", "input_size", "input_version", "mask_key", "mask_size", "mask_version",
                   "mask_preset", "mask_seed", "model_sha256", "model_name", "model_version", "model_ref",
                   "format", "pixels_version", "fingerprint")


@dataclass
class InferOptions:
    """Options of ``deepfill infer`` (each top-level field is also a flag: ``batch_size`` -> ``--batch-size``)."""

    images: str  # folder, file:// or s3:// prefix of the input images
    output: str  # folder, file:// or s3:// prefix for the inpainted PNGs and manifest.jsonl (apart from --images)
    model: str  # models:/name@alias, models:/name/N, runs:/id/model, a generator file or checkpoint folder
    masks: str | None = None  # tree of masks paired by relative key (a/b/c.jpg <-> a/b/c.png), white = hole
    mask_preset: str | None = None  # draw masks instead: box, strokes, mixed, thin_256, thick_512, ...
    seed: int = 0  # seed of --mask-preset (masks are drawn from seed and key)
    batch_size: int = 4  # images per actor call
    num_actors: int = 2  # model actors in the pool (one GPU each with --use-gpu)
    num_cpus_per_actor: float = 1.0  # CPUs reserved per actor (also its torch threads)
    use_gpu: bool = False  # one GPU per actor
    max_errors: int = 50  # bad inputs tolerated before the job stops with exit code 1 (-1 = no limit)
    format: Literal["png"] = "png"  # output format (lossless, so known pixels stay exact)
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb limit: larger input images are rejected
    max_bytes: str = f"{DEFAULT_MAX_BYTES // 2**20}MB"  # images and masks larger than this (listed size) are rejected: too_large; bytes or e.g. 64MB
    overwrite: bool = False  # replace outputs that another model (other generator sha256) wrote under --output

    def __post_init__(self):
        if (self.masks is None) == (self.mask_preset is None):
            raise ValueError("give exactly one of masks (--masks) or mask_preset (--mask-preset)")
        if self.mask_preset is not None:
            from pipeline.masks import MASK_KINDS

            if self.mask_preset not in MASK_KINDS:
                raise ValueError(f"mask_preset must be one of {', '.join(MASK_KINDS)}, got {self.mask_preset!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {self.num_actors}")
        if not self.num_cpus_per_actor > 0:
            raise ValueError(f"num_cpus_per_actor must be > 0, got {self.num_cpus_per_actor}")
        if self.max_errors < -1:
            raise ValueError(f"max_errors must be >= 0 (or -1 for no limit), got {self.max_errors}")
        if self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")
        try:
            self.max_bytes_limit  # noqa: B018 - validates max_bytes
        except ValueError as err:
            raise ValueError(f"max_bytes: {err}") from None
        from pipeline.storage import overlap, redact

        for name, source in (("images", self.images), ("masks", self.masks)):
            how = overlap(self.output, source) if source is not None else None
            if how is not None:
                raise ValueError(
                    f"output (--output {redact(self.output)}) {how} {name} (--{name} {redact(source)}): outputs "
                    f"would be read back as {name} or written over them; choose an --output apart from it")


    @property
    def max_bytes_limit(self) -> int:
        """``max_bytes`` in bytes."""
        from pipeline.config import parse_size

        return parse_size(self.max_bytes)

Options = InferOptions  # what `deepfill infer` reads (jobs.cli)


@dataclass
class InferResult:
    """What one run did: per-status counts, the manifest location and the exit code (2: refused up front)."""

    exit_code: int
    processed: int  # keys sent through the model actors this run
    counts: dict[str, int] = field(default_factory=dict)  # status -> keys, over the merged manifest
    errors_this_run: int = 0
    skipped: int = 0  # keys whose output already matches (not redone)
    manifest_uri: str = ""
    message: str = ""


def stem(key: str) -> str:
    """``a/b/c.jpg`` -> ``a/b/c`` (the pairing key between images, masks and outputs)."""
    base = key.rsplit("/", 1)[-1]
    return key[: len(key) - len(base)] + (base.rsplit(".", 1)[0] if "." in base else base)


def output_key(key: str, fmt: str = "png") -> str:
    return f"{stem(key)}.{fmt}"


def _detail(err: BaseException | str) -> str:
    """An error's cause for the manifest: credentials removed, at most DETAIL_CHARS characters."""
    from pipeline.storage import redact

    text = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    return redact(text)[:DETAIL_CHARS]


def _row(key: str, out: str | None, status: str, reason: str = "", detail: str = "", /, **fields) -> dict:
    """A manifest row with every field of MANIFEST_FIELDS (unknown ones null)."""
    row = dict.fromkeys(MANIFEST_FIELDS)
    row.update(fields)
    row.update(key=key, output=out, status=status, reason=reason, detail=detail)
    return row


# ---------------------------------------------------------------------------------------------------------
# Provenance and planning: pure functions of listings, no Ray, bounded memory.


def _digest(text: str) -> int:
    """A key as a 128-bit BLAKE2b digest: what the planner holds per key instead of the string (collision odds
    about n^2 / 2^129, ~1e-27 at a million keys)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=16).digest(), "big")


def fingerprint(prov: dict) -> str:
    """16 hex digits of the sha256 of the provenance fields that decide an output's pixels."""
    text = json.dumps(prov, sort_keys=True, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


@dataclass(frozen=True)
class PlanSettings:
    """What besides the input and its mask decides the pixels (fingerprinted), and the byte cap (not)."""

    model_sha256: str  # sha256 of the generator file bytes
    format: str = "png"
    mask_preset: str | None = None  # None: masks come from the listed masks tree
    seed: int = 0  # of mask_preset
    max_bytes: int = DEFAULT_MAX_BYTES  # images and masks listed larger are rejected (too_large, mask_too_large)


# Errors that the same input, mask and model give again on every run (the bytes are bad): a rerun keeps their
# rows when the fingerprint matches. Errors that another run may not meet (read_failed, write_failed,
# inference_failed, missing_input) or that depend on a limit outside the fingerprint (decompression_bomb,
# too_large: --max-pixels, --max-bytes) are retried.
SETTLED_ERRORS = frozenset({
    "empty", "not_an_image", "truncated", "corrupt", "unsupported_mode", "no_hole", "mask_empty",
    "mask_not_an_image", "mask_truncated", "mask_corrupt", "mask_unsupported_mode", "mask_size_mismatch",
})


class Previous:
    """What earlier runs finished under an output, compact: for each key whose latest row is "ok" (or a
    SETTLED_ERRORS error), the fingerprint of its provenance, as {128-bit key digest: 64-bit int}; and the
    models behind the "ok" rows (``models``: sha256 -> [name, version, ref, rows]). About 120 bytes a key."""

    def __init__(self):
        self.fingerprints: dict[int, int] = {}  # "ok" rows
        self.errors: dict[int, int] = {}  # settled error rows
        self.models: dict[str, list] = {}

    def add(self, key: str, fingerprint: str, model_sha256: str | None = None, model_name: str | None = None,
            model_version: str | None = None, model_ref: str | None = None, *, error: bool = False) -> None:
        self._add(_digest(key), int(fingerprint, 16), (model_sha256, model_name, model_version, model_ref), error)

    def _add(self, digest: int, fp: int, model: tuple, error: bool = False) -> None:
        if error:
            self.errors[digest] = fp
            return
        self.fingerprints[digest] = fp
        if model[0]:
            entry = self.models.setdefault(model[0], [model[1], model[2], model[3], 0])
            entry[3] += 1

    def matches(self, key_digest: int, fp: str) -> bool:
        """The key's latest row is "ok" with this fingerprint."""
        return self.fingerprints.get(key_digest) == int(fp, 16)

    def settled_error(self, key_digest: int, fp: str) -> bool:
        """The key's latest row is a SETTLED_ERRORS error with this fingerprint."""
        return self.errors.get(key_digest) == int(fp, 16)

    def __len__(self) -> int:
        return len(self.fingerprints)

    @classmethod
    def from_journal(cls, output: str, storage_options=None) -> Previous:
        """From ``<output>/manifest.jsonl`` and every journal part (the latest row per key wins)."""
        from pipeline import journal

        models: dict[tuple, tuple] = {}  # one shared tuple per model

        def value(row: dict):
            fp = row.get("fingerprint")
            error = row.get("status") == "error" and row.get("reason") in SETTLED_ERRORS
            if (row.get("status") != "ok" and not error) or not isinstance(fp, str) or len(fp) != 16:
                return None
            try:
                fp_int = int(fp, 16)
            except ValueError:
                return None
            m = (row.get("model_sha256"), row.get("model_name"), row.get("model_version"), row.get("model_ref"))
            return fp_int, models.setdefault(m, m), error

        prev = cls()
        for digest, v in journal.latest(output, storage_options, key=lambda r: _digest(r["key"]),
                                        value=value).items():
            if v is not None:
                prev._add(digest, v[0], v[1], v[2])
        return prev


_PRESENT, _CLAIMED = 1, 2


def plan_entries(images: Iterable, outputs: Iterable, previous: Previous, settings: PlanSettings,
                 masks: Iterable | None = None) -> Iterator[tuple[str, dict]]:
    """Decide every input key: yields ``(action, row)`` in the order of ``images``.

    ``images``, ``outputs``, ``masks``: iterables of ``pipeline.storage.Entry`` (key, size, version), e.g.
    ``storage.iter_entries(uri, hidden=True)``, or synthetic ones; names not ending in an image suffix
    (outputs: ``.<format>``) are ignored. ``masks`` is None with ``settings.mask_preset``. ``outputs`` and
    ``masks`` are read first into compact dicts of digests; ``images`` are streamed.

    Actions: ``"skip"`` (row ``{"key"}``: its latest row is ok with this fingerprint and the output exists),
    ``"error"`` (a manifest row settled on the driver; ``row["stale"]`` says whether an output file exists
    for it that should be deleted), ``"run"`` (a row of TODO_COLUMNS for the actors).
    Memory: ~90 bytes per output, ~180 per mask, plus ``previous``; nothing per image beyond its output's entry.
    """
    from pipeline.storage import unsafe_key

    fmt_suffix = f".{settings.format}"
    outs: dict[int, int] = {}  # output key digest -> _PRESENT | _CLAIMED flags
    for e in outputs:
        if e.key.lower().endswith(fmt_suffix):
            outs[_digest(e.key)] = _PRESENT
    mask_by_stem: dict[int, str] | None = None
    if masks is not None:
        mask_by_stem, unsafe = {}, 0  # stem digest -> "suffix\0size\0version"
        for e in masks:
            if not e.key.lower().endswith(IMAGE_SUFFIXES):
                continue
            if unsafe_key(e.key):
                unsafe += 1
                continue
            s = stem(e.key)
            d = _digest(s)
            if d not in mask_by_stem or e.key.lower().endswith(".png"):  # prefer a .png mask
                mask_by_stem[d] = f"{e.key[len(s):]}\0{e.size}\0{e.version}"
        if unsafe:
            log.warning("%d mask key(s) refused by storage.unsafe_key are ignored", unsafe)
    preset = settings.mask_preset if masks is None else None
    for e in images:
        key = e.key
        if not key.lower().endswith(IMAGE_SUFFIXES):
            continue
        why = unsafe_key(key)
        if why:
            yield "error", _row(key, None, "error", "unsafe_key", _detail(f"key refused: {why}"),
                                input_size=e.size, input_version=e.version, stale=False)
            continue
        out = output_key(key, settings.format)
        out_digest = _digest(out)
        flags = outs.get(out_digest, 0)
        if flags & _CLAIMED:
            yield "error", _row(key, out, "error", "output_collision", f"another input maps to {out}",
                                input_size=e.size, input_version=e.version, stale=False)
            continue
        outs[out_digest] = flags | _CLAIMED
        stale = bool(flags & _PRESENT)
        prov = {"key": key, "output": out, "input_size": e.size, "input_version": e.version, "mask_key": None,
                "mask_size": None, "mask_version": None, "mask_preset": preset,
                "mask_seed": settings.seed if preset is not None else None, "model_sha256": settings.model_sha256,
                "format": settings.format, "pixels_version": PIXELS_VERSION}
        if mask_by_stem is not None:
            s = stem(key)
            packed = mask_by_stem.get(_digest(s))
            if packed is None:
                yield "error", _row(key, out, "error", "missing_mask", "no mask with this key under --masks",
                                    **prov, stale=stale)
                continue
            suffix, size, version = packed.split("\0")
            prov.update(mask_key=s + suffix, mask_size=int(size), mask_version=version)
        fp = fingerprint(prov)
        if (stale and previous.matches(_digest(key), fp)) or (not stale and previous.settled_error(_digest(key), fp)):
            yield "skip", {"key": key}  # its row stays: an output that is still right, or an error it would repeat
            continue
        reason, detail = "", ""
        if e.size < 0:
            reason, detail = "read_failed", "listed with size -1 (a broken link or unreadable file)"
        elif e.size > settings.max_bytes:
            reason, detail = "too_large", f"{e.size} bytes > --max-bytes {settings.max_bytes}"
        elif prov["mask_size"] is not None and prov["mask_size"] < 0:
            reason, detail = "read_failed", "mask listed with size -1 (a broken link or unreadable file)"
        elif prov["mask_size"] is not None and prov["mask_size"] > settings.max_bytes:
            reason, detail = "mask_too_large", f"{prov['mask_size']} bytes > --max-bytes {settings.max_bytes}"
        if reason:
            yield "error", _row(key, out, "error", reason, detail, **prov, fingerprint=fp, stale=stale)
            continue
        yield "run", {"key": key, "mask_key": prov["mask_key"] or "", "out_key": out, "input_size": e.size,
                      "input_version": e.version, "mask_size": -1 if prov["mask_size"] is None else prov["mask_size"],
                      "mask_version": prov["mask_version"] or "", "fingerprint": fp, "stale": stale}


# ---------------------------------------------------------------------------------------------------------
# Worker side: pure functions of bytes, shared by the Ray job and the benchmark's sequential loop.


def decode_pair(key: str, image_bytes: bytes, mask_bytes: bytes | None, *, mask_preset: str | None, seed: int,
                max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """Bytes -> (image uint8 (H, W, 3) RGB, mask uint8 (H, W) {0, 1}, 1 = hole); raises ImageRejected."""
    from pipeline.images import ImageRejected, decode_image, decode_mask

    image = decode_image(image_bytes, max_pixels=max_pixels)
    h, w = image.shape[:2]
    if mask_preset is not None:
        from pipeline.masks import generate_mask, mask_rng

        mask = generate_mask(mask_preset, h, w, mask_rng(seed, 0, key))
    else:
        mask = decode_mask(mask_bytes if mask_bytes is not None else b"", h, w)
    if not mask.any():
        raise ImageRejected("no_hole", "the mask has no hole pixels")
    return image, mask


def read_inputs(batch: dict[str, np.ndarray], *, images: str, masks: str | None, max_bytes: int = DEFAULT_MAX_BYTES,
                storage_options=None) -> dict[str, np.ndarray]:
    """Ray Data task: fetch each row's image (and mask) bytes by exact key; a failure becomes a reason and a
    detail (``missing_input``, ``missing_mask``, ``read_failed``, ``too_large``/``mask_too_large``)."""
    from pipeline import storage

    def fetch(root: str, key: str, what: str) -> tuple[bytes, str, str]:
        """(bytes, reason, detail) of one object: the reasons carry ``what``'s prefix (image: none, mask: mask_)."""
        prefix = "" if what == "image" else "mask_"
        try:
            data = storage.read_bytes(storage.join(root, key), storage_options)
        except FileNotFoundError as err:
            return b"", "missing_input" if what == "image" else "missing_mask", _detail(err)
        except Exception as err:  # noqa: BLE001 - recorded per row, never fails the block
            return b"", "read_failed", _detail(err if what == "image" else f"mask: {type(err).__name__}: {err}")
        if len(data) > max_bytes:
            return b"", f"{prefix}too_large", f"{len(data)} bytes > --max-bytes {max_bytes}"
        return data, "", ""

    image_bytes, mask_bytes, reasons, details = [], [], [], []
    for key, mask_key in zip(batch["key"], batch["mask_key"]):
        mask = b""
        data, reason, detail = fetch(images, str(key), "image")
        if not reason and masks is not None:
            mask, reason, detail = fetch(masks, str(mask_key), "mask")
        image_bytes.append(data if not reason else b"")
        mask_bytes.append(mask if not reason else b"")
        reasons.append(reason)
        details.append(detail)
    out = dict(batch)
    out["image_bytes"] = np.array(image_bytes, dtype=object)
    out["mask_bytes"] = np.array(mask_bytes, dtype=object)
    out["read_reason"] = np.array(reasons, dtype=object)
    out["read_detail"] = np.array(details, dtype=object)
    return out


def _py(value):
    """A numpy scalar as a plain Python value."""
    return value.item() if hasattr(value, "item") else value


class InpaintWorker:
    """Ray Data callable class: loads the generator once, then inpaints, encodes and writes each batch.

    ``__call__`` takes rows of TODO_COLUMNS plus {image_bytes, mask_bytes, read_reason, read_detail} and
    returns ``{"row": JSON strings}``, one manifest row per input row (this run's constant fields are added
    by the driver). Every failure is caught per row and recorded as status "error" with a reason and a
    detail; the output of a failed row that had one (``stale``) is deleted.
    """

    def __init__(self, generator_bytes, *, output: str, mask_preset: str | None, seed: int, max_pixels: int,
                 storage_options=None, device: str | None = None, threads: int | None = None):
        import torch

        import models.checkpoint

        if threads:
            torch.set_num_threads(int(threads))
        if not isinstance(generator_bytes, (bytes, bytearray)):
            import ray

            generator_bytes = ray.get(generator_bytes)
        self.generator, _ = models.checkpoint.load_for_inference(generator_bytes, device=device)
        self.output = output
        self.mask_preset = mask_preset
        self.seed = seed
        self.max_pixels = max_pixels
        self.storage_options = storage_options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipeline import storage
        from pipeline.images import ImageRejected, encode_png
        from pipeline.journal import dumps, now

        rows: list[dict] = []
        decoded: list[tuple[int, np.ndarray, np.ndarray, float]] = []  # (row index, image, mask, seconds)
        for i, key in enumerate(batch["key"]):
            t0 = time.perf_counter()
            mask_key = str(batch["mask_key"][i]) or None
            rows.append(_row(str(key), str(batch["out_key"][i]), "error", input_size=int(batch["input_size"][i]),
                             input_version=str(batch["input_version"][i]), mask_key=mask_key,
                             mask_size=int(batch["mask_size"][i]) if mask_key else None,
                             mask_version=str(batch["mask_version"][i]) if mask_key else None,
                             fingerprint=str(batch["fingerprint"][i])))
            if batch["read_reason"][i]:
                rows[i].update(reason=str(batch["read_reason"][i]), detail=str(batch["read_detail"][i]))
                continue
            try:
                image, mask = decode_pair(str(key), batch["image_bytes"][i], batch["mask_bytes"][i],
                                          mask_preset=self.mask_preset, seed=self.seed, max_pixels=self.max_pixels)
            except ImageRejected as err:
                rows[i].update(reason=err.reason, detail=_detail(err.detail))
                continue
            except Exception as err:  # noqa: BLE001
                rows[i].update(reason="corrupt", detail=_detail(err))
                continue
            rows[i].update(height=int(image.shape[0]), width=int(image.shape[1]), hole_fraction=float(mask.mean()))
            decoded.append((i, image, mask, time.perf_counter() - t0))

        # one forward pass per group of same-size images
        groups: dict[tuple[int, int], list] = {}
        for item in decoded:
            groups.setdefault(item[1].shape[:2], []).append(item)
        chunks = []
        for items in groups.values():  # cap the pixels of one forward pass (memory of big images)
            h, w = items[0][1].shape[:2]
            step = max(1, MAX_BATCH_PIXELS // (h * w))
            chunks.extend(items[j : j + step] for j in range(0, len(items), step))
        for items in chunks:
            t0 = time.perf_counter()
            try:
                images = np.stack([it[1] for it in items])  # (n, H, W, 3)
                masks = np.stack([it[2] for it in items])[..., None]  # (n, H, W, 1)
                results = self._inpaint(images, masks)
            except Exception as err:  # noqa: BLE001
                log.exception("inference failed for %d image(s)", len(items))
                for it in items:
                    rows[it[0]].update(reason="inference_failed", detail=_detail(err))
                continue
            share = (time.perf_counter() - t0) / len(items)
            for (i, _, _, decode_s), result in zip(items, results):
                t1 = time.perf_counter()
                try:
                    storage.write_bytes_atomic(storage.join(self.output, rows[i]["output"]), encode_png(result),
                                               self.storage_options)
                except Exception as err:  # noqa: BLE001
                    rows[i].update(reason="write_failed", detail=_detail(err))
                    continue
                rows[i].update(status="ok", reason="", seconds=decode_s + share + time.perf_counter() - t1)
        for i, row in enumerate(rows):
            row["time"] = now()
            if row["status"] == "error" and bool(batch["stale"][i]):
                try:  # an output of an earlier provenance: do not leave it behind an error row
                    storage.delete(storage.join(self.output, row["output"]), self.storage_options)
                except Exception as err:  # noqa: BLE001
                    log.warning("could not delete the stale output %s: %s", row["output"], _detail(err))
        return {"row": np.array([dumps(r) for r in rows], dtype=object)}

    def _inpaint(self, images: np.ndarray, masks: np.ndarray) -> np.ndarray:
        import models

        return models.inpaint_uint8(self.generator, images, masks)


# ---------------------------------------------------------------------------------------------------------
# Driver side.


def _model_label(name, version, ref) -> str:
    if name:
        return f"{name} version {version}" if version else str(name)
    return str(ref or "an unregistered checkpoint")


def _refusal(output: str, previous: Previous, sha: str, label: str) -> str | None:
    """The one-line refusal when ``output`` holds rows of another model, else None."""
    from pipeline.storage import redact

    others = {s: m for s, m in previous.models.items() if s != sha}
    if not others:
        return None
    other_sha, (name, version, ref, rows) = max(others.items(), key=lambda kv: kv[1][3])
    more = f" (and {len(others) - 1} other model(s))" if len(others) > 1 else ""
    return (f"--output {redact(output)} holds {rows} output(s) of model {redact(_model_label(name, version, ref))} "
            f"(sha256 {other_sha[:12]}…){more}; rerun with --overwrite to replace them with model "
            f"{redact(label)} (sha256 {sha[:12]}…), or choose another --output")


class _TodoTable:
    """The keys to send to the actors, held as Arrow columns (~150 bytes a key) rather than Python dicts."""

    def __init__(self, chunk: int = 8192):
        self.chunk = chunk
        self.tables: list = []
        self.rows: list[dict] = []
        self.n = 0

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.n += 1
        if len(self.rows) >= self.chunk:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self.rows:
            self.tables.append(pa.Table.from_pylist(self.rows))
            self.rows = []

    def slices(self, blocks: int) -> list:
        """The whole table cut into ``blocks`` zero-copy slices (one Ray Data block each)."""
        import pyarrow as pa

        self._flush()
        table = pa.concat_tables(self.tables)  # chunked: slices stay zero-copy
        self.tables = []
        step = math.ceil(table.num_rows / blocks)
        return [table.slice(i, step) for i in range(0, table.num_rows, step)]


def run_infer(opts: InferOptions, storage_options=None) -> InferResult:
    """Run ``deepfill infer``; returns an InferResult (never raises for bad input rows).

    Exit codes: 0 done, 1 error budget exceeded, 2 refused up front (another model's outputs, see the module
    docstring), with ``message`` the one line saying why.
    """
    from jobs import serving
    from pipeline import journal, storage

    manifest_uri = storage.join(opts.output, MANIFEST_NAME)
    generator_bytes, info = serving.fetch_checkpoint(opts.model)
    sha = hashlib.sha256(generator_bytes).hexdigest()
    name, version = info.get("model_name"), info.get("model_version")
    label = _model_label(name, version, opts.model)
    previous = Previous.from_journal(opts.output, storage_options)
    refusal = _refusal(opts.output, previous, sha, label)
    if refusal and not opts.overwrite:
        return InferResult(exit_code=2, processed=0, manifest_uri=manifest_uri, message=refusal)
    if refusal:
        log.warning("--overwrite: replacing outputs of other model(s) with %s (sha256 %s…)", label, sha[:12])

    run_id = journal.new_run_id()
    constants = {"run": run_id, "model_sha256": sha, "model_name": name,
                 "model_version": None if version is None else str(version),
                 "model_ref": storage.redact(opts.model), "format": opts.format, "mask_preset": opts.mask_preset,
                 "mask_seed": opts.seed if opts.mask_preset is not None else None, "pixels_version": PIXELS_VERSION}
    settings = PlanSettings(model_sha256=sha, format=opts.format, mask_preset=opts.mask_preset, seed=opts.seed,
                            max_bytes=opts.max_bytes_limit)
    budget = math.inf if opts.max_errors < 0 else opts.max_errors
    errors = processed = skipped = 0
    todo = _TodoTable()
    settled: list[dict] = []
    jr = journal.open_journal(opts.output, run_id, storage_options)
    try:
        masks = storage.iter_entries(opts.masks, storage_options, hidden=True) if opts.masks is not None else None
        for action, row in plan_entries(storage.iter_entries(opts.images, storage_options, hidden=True),
                                        storage.iter_entries(opts.output, storage_options, hidden=True),
                                        previous, settings, masks):
            if action == "skip":
                skipped += 1
            elif action == "run":
                todo.add(row)
            else:
                errors += 1
                log.warning("skipped %s: %s %s", row["key"], row["reason"], row["detail"])
                if row.pop("stale"):
                    storage.delete(storage.join(opts.output, row["output"]), storage_options)
                row.update(constants, time=journal.now())
                settled.append(row)
                if len(settled) >= 1000:
                    jr.append(settled)
                    settled = []
        jr.append(settled)
        del previous  # the plan is made: free the per-key state before the actors run
        log.info("model %s (sha256 %s…): %d to inpaint, %d already done, %d errors", label, sha[:12], todo.n,
                 skipped, errors)
        if todo.n and errors <= budget:
            processed, errors = _run_actors(opts, todo, generator_bytes, jr, constants, errors, budget,
                                            storage_options)
    finally:
        jr.close()
        counts = journal.merge(opts.output, storage_options, remove_run=run_id, count=lambda r: r.get("status"))
    counts = {s: counts.get(s, 0) for s in STATUSES}
    if errors > budget:
        message = (f"error budget exceeded: {errors} bad inputs > --max-errors {opts.max_errors}; stopped early. "
                   f"Outputs already written are complete; see {MANIFEST_NAME} for reasons.")
        log.error(message)
        exit_code = 1
    else:
        exit_code = 0
        message = (f"done: {processed} processed this run, {skipped} already done, {errors} errors; manifest: "
                   f"ok {counts['ok']}, error {counts['error']}")
        log.info(message)
    return InferResult(exit_code=exit_code, processed=processed, counts=counts, errors_this_run=errors,
                       skipped=skipped, manifest_uri=manifest_uri, message=message)


def _init_ray():
    import ray

    from pipeline.cluster import connect

    connect()
    return ray


def _run_actors(opts: InferOptions, todo: _TodoTable, generator_bytes: bytes, jr, constants: dict, errors: int,
                budget: float, storage_options) -> tuple[int, int]:
    """The Ray Data part: journal the rows as batches come back; stop when the error budget is spent."""
    from pipeline.progress import Progress

    ray = _init_ray()
    import ray.data

    total = todo.n
    generator_ref = ray.put(generator_bytes)
    blocks = max(1, min(total, max(2 * opts.num_actors, math.ceil(total / opts.batch_size))))
    ds = ray.data.from_arrow(todo.slices(blocks))
    # I/O-bound fetch tasks reserve no CPU, so they run beside actors that hold every CPU of the cluster
    ds = ds.map_batches(read_inputs, batch_size=opts.batch_size, num_cpus=0,
                        compute=ray.data.TaskPoolStrategy(size=max(2, opts.num_actors)),
                        fn_kwargs={"images": opts.images, "masks": opts.masks, "max_bytes": opts.max_bytes_limit,
                                   "storage_options": storage_options})
    ds = ds.map_batches(
        InpaintWorker,
        fn_constructor_args=(generator_ref,),
        fn_constructor_kwargs={
            "output": opts.output, "mask_preset": opts.mask_preset, "seed": opts.seed,
            "max_pixels": opts.max_pixels, "storage_options": storage_options,
            "device": "cuda" if opts.use_gpu else "cpu", "threads": max(1, int(opts.num_cpus_per_actor)),
        },
        batch_size=opts.batch_size,
        compute=ray.data.ActorPoolStrategy(size=opts.num_actors),
        num_cpus=opts.num_cpus_per_actor,
        num_gpus=1 if opts.use_gpu else 0,
    )
    processed = 0
    with Progress("infer", total=total, unit="images") as progress:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            rows = []
            for text in batch["row"]:
                row = json.loads(str(text))
                row.update(constants)
                rows.append(row)
                if row["status"] == "error":
                    errors += 1
                    log.warning("skipped %s: %s %s", row["key"], row["reason"], row["detail"])
            jr.append(rows)
            processed += len(rows)
            progress.update(len(rows))
            progress.set_postfix(f"{errors} errors")
            if errors > budget:
                break  # leaving the iterator stops the dataset; written outputs are complete files
    return processed, errors


# ---------------------------------------------------------------------------------------------------------
# CLI


def run(opts: InferOptions) -> int:
    """``deepfill infer`` once its options are resolved (``jobs.cli``): prints a JSON summary, or one line on
    stderr when the run is refused (exit code 2)."""
    from pipeline.storage import redact

    result = run_infer(opts)
    if result.exit_code == 2:
        print(f"deepfill infer: {result.message}", file=sys.stderr)
        return 2
    print(json.dumps({"processed": result.processed, "skipped": result.skipped, "errors": result.errors_this_run,
                      **result.counts, "manifest": redact(result.manifest_uri), "exit_code": result.exit_code}))
    return result.exit_code


if __name__ == "__main__":
    from jobs.cli import main

    sys.exit(main(["infer", *sys.argv[1:]]))
