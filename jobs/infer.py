"""``deepfill infer``: inpaint every image under a folder or S3 prefix with a pool of Ray Data model actors.

    deepfill infer --images s3://bucket/photos --output s3://bucket/filled --model models:/deepfill@candidate \\
        (--masks s3://bucket/masks | --mask-preset thick_512 --seed 0) [--batch-size 4] [--num-actors 2] \\
        [--use-gpu] [--max-errors 50]

How it runs:

1. The driver lists the image keys (relative paths such as ``a/b/c.jpg``), pairs each with its mask by
   relative key without the suffix (``a/b/c.png`` — any image suffix — in the masks tree), lists the outputs
   already present and fetches the generator file once (any ``jobs.serving.load_generator`` ref); the
   generator bytes travel to the actors through Ray's object store, so workers need no MLflow access.
2. Ray Data: a dataset of the keys still to do -> ``read_inputs`` tasks fetch the image and mask bytes ->
   ``InpaintWorker`` actors (``ActorPoolStrategy(size=--num-actors)``, one GPU each with ``--use-gpu``) decode
   (``pipeline.images``: EXIF orientation, RGB), inpaint each image at its own size through ``models.inpaint``
   (images of one size in a batch share a forward pass, up to MAX_BATCH_PIXELS), encode PNG and write it to the same relative key
   under ``--output`` with the suffix ``.png`` via ``pipeline.storage.write_bytes_atomic`` (written aside and
   moved into place locally; one PUT on S3), so a reader never sees a partial file.
3. Every key yields one manifest row; bad input never fails a block: it becomes a row with status "error"
   and a reason. The driver streams the rows, logs each skip/error with its reason, and stops once the
   errors exceed ``--max-errors`` (exit code 1; outputs already written are complete).

The manifest, ``<output>/manifest.jsonl``, has one JSON object per input key, sorted by key:
``key, output, status ("ok" | "skipped" | "error"), reason, hole_fraction, seconds, height, width, run``.
It is merged with the previous run's manifest and rewritten atomically at the end, so a rerun never
duplicates rows. A rerun skips keys whose output exists: they keep their earlier row, or get status
"skipped", reason "output_exists" when there is none (e.g. after a run that was killed). Errors are retried.

Reasons: the ``pipeline.images`` codes (``empty``, ``not_an_image``, ``truncated``, ``corrupt``,
``decompression_bomb``, ``mask_size_mismatch``, ``empty_mask`` ...), plus ``missing_mask``, ``no_hole`` (a
mask without hole pixels), ``output_collision`` (two inputs map to one output key), ``read_failed``,
``inference_failed`` and ``write_failed``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from pipeline.config import DEFAULT_MAX_PIXELS
from pipeline.images import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"
STATUSES = ("ok", "skipped", "error")
MAX_BATCH_PIXELS = 2048 * 2048  # images of one size share a forward pass up to this many pixels
MANIFEST_FIELDS = ("key", "output", "status", "reason", "hole_fraction", "seconds", "height", "width", "run")


@dataclass
class InferOptions:
    """Options of ``deepfill infer`` (each top-level field is also a flag: ``batch_size`` -> ``--batch-size``)."""

    images: str  # folder, file:// or s3:// prefix of the input images
    output: str  # folder, file:// or s3:// prefix for the inpainted PNGs and manifest.jsonl
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


Options = InferOptions  # what `deepfill infer` reads (jobs.cli)


@dataclass
class InferResult:
    """What one run did: per-status counts for this run, the manifest location and the exit code."""

    exit_code: int
    processed: int  # keys sent through the model actors this run
    counts: dict[str, int] = field(default_factory=dict)  # status -> keys, over the merged manifest
    errors_this_run: int = 0
    manifest_uri: str = ""
    message: str = ""


def stem(key: str) -> str:
    """``a/b/c.jpg`` -> ``a/b/c`` (the pairing key between images, masks and outputs)."""
    base = key.rsplit("/", 1)[-1]
    return key[: len(key) - len(base)] + (base.rsplit(".", 1)[0] if "." in base else base)


def output_key(key: str, fmt: str = "png") -> str:
    return f"{stem(key)}.{fmt}"


def _row(key: str, out: str, status: str, reason: str = "", *, hole_fraction: float = math.nan,
         seconds: float = 0.0, height: int = 0, width: int = 0, run: str = "") -> dict:
    return {"key": key, "output": out, "status": status, "reason": reason, "hole_fraction": float(hole_fraction),
            "seconds": float(seconds), "height": int(height), "width": int(width), "run": run}


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


def read_inputs(batch: dict[str, np.ndarray], *, images: str, masks: str | None,
                storage_options=None) -> dict[str, np.ndarray]:
    """Ray Data task: fetch the bytes of each row's image (and mask); a failed read becomes a reason."""
    from pipeline import storage

    image_bytes, mask_bytes, reasons = [], [], []
    for key, mask_key in zip(batch["key"], batch["mask_key"]):
        try:
            image_bytes.append(storage.read_bytes(storage.join(images, str(key)), storage_options))
            mask_bytes.append(storage.read_bytes(storage.join(masks, str(mask_key)), storage_options)
                              if masks is not None else b"")
            reasons.append("")
        except Exception as err:  # noqa: BLE001 - recorded per row, never fails the block
            image_bytes.append(b"")
            mask_bytes.append(b"")
            reasons.append("missing_input" if isinstance(err, FileNotFoundError) else "read_failed")
    out = dict(batch)
    out["image_bytes"] = np.array(image_bytes, dtype=object)
    out["mask_bytes"] = np.array(mask_bytes, dtype=object)
    out["read_reason"] = np.array(reasons, dtype=object)
    return out


class InpaintWorker:
    """Ray Data callable class: loads the generator once, then inpaints, encodes and writes each batch.

    ``__call__`` takes rows {key, out_key, image_bytes, mask_bytes, read_reason} and returns manifest rows
    (see MANIFEST_FIELDS). Every failure is caught per row and recorded as status "error" with a reason.
    """

    def __init__(self, generator_bytes, *, output: str, mask_preset: str | None, seed: int, max_pixels: int,
                 run: str, storage_options=None, device: str | None = None, threads: int | None = None):
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
        self.run = run
        self.storage_options = storage_options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipeline.images import ImageRejected

        rows: list[dict] = []
        decoded: list[tuple[int, np.ndarray, np.ndarray, float]] = []  # (row index, image, mask, seconds)
        for i, key in enumerate(batch["key"]):
            key, out = str(key), str(batch["out_key"][i])
            t0 = time.perf_counter()
            rows.append(_row(key, out, "error", run=self.run))
            if batch["read_reason"][i]:
                rows[i]["reason"] = str(batch["read_reason"][i])
                continue
            try:
                image, mask = decode_pair(key, batch["image_bytes"][i], batch["mask_bytes"][i],
                                          mask_preset=self.mask_preset, seed=self.seed, max_pixels=self.max_pixels)
            except ImageRejected as err:
                rows[i]["reason"] = err.reason
                continue
            except Exception:  # noqa: BLE001
                rows[i]["reason"] = "corrupt"
                continue
            rows[i].update(height=image.shape[0], width=image.shape[1], hole_fraction=float(mask.mean()))
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
            except Exception:  # noqa: BLE001
                log.exception("inference failed for %d image(s)", len(items))
                for it in items:
                    rows[it[0]]["reason"] = "inference_failed"
                continue
            share = (time.perf_counter() - t0) / len(items)
            for (i, _, _, decode_s), result in zip(items, results):
                t1 = time.perf_counter()
                try:
                    from pipeline import storage
                    from pipeline.images import encode_png

                    data = encode_png(result)
                    storage.write_bytes_atomic(storage.join(self.output, rows[i]["output"]), data,
                                               self.storage_options)
                except Exception:  # noqa: BLE001
                    rows[i]["reason"] = "write_failed"
                    continue
                rows[i].update(status="ok", reason="", seconds=decode_s + share + time.perf_counter() - t1)
        return {name: np.array([r[name] for r in rows]) for name in MANIFEST_FIELDS}

    def _inpaint(self, images: np.ndarray, masks: np.ndarray) -> np.ndarray:
        import models

        return models.inpaint_uint8(self.generator, images, masks)


# ---------------------------------------------------------------------------------------------------------
# Driver side.


def read_manifest(uri: str, storage_options=None) -> dict[str, dict]:
    """The rows of an existing manifest by key ({} when there is none)."""
    from pipeline import storage

    if not storage.exists(uri, storage_options):
        return {}
    rows = {}
    for line in storage.read_bytes(uri, storage_options).decode("utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["key"]] = row
    return rows


def write_manifest(uri: str, rows: dict[str, dict], storage_options=None) -> None:
    from pipeline import storage

    text = "".join(json.dumps(rows[k], sort_keys=True) + "\n" for k in sorted(rows))
    storage.write_bytes_atomic(uri, text.encode("utf-8"), storage_options)


def plan(opts: InferOptions, storage_options=None) -> tuple[list[dict], list[dict]]:
    """List inputs, masks and outputs; returns (rows to send to the actors, rows settled on the driver).

    Rows to send: {key, mask_key, out_key}. Settled rows are manifest rows: outputs that already exist
    (status "skipped", reason "output_exists") and inputs that cannot be run (missing mask, output collision).
    """
    from pipeline import storage

    keys = storage.list_files(opts.images, IMAGE_SUFFIXES, storage_options)
    done = set(storage.list_files(opts.output, (f".{opts.format}",), storage_options))
    mask_by_stem: dict[str, str] = {}
    if opts.masks is not None:
        for mk in storage.list_files(opts.masks, IMAGE_SUFFIXES, storage_options):
            s = stem(mk)
            if s not in mask_by_stem or mk.lower().endswith(".png"):  # prefer a .png mask
                mask_by_stem[s] = mk
    todo, settled, claimed = [], [], set()
    for key in keys:
        out = output_key(key, opts.format)
        if out in claimed:
            settled.append(_row(key, out, "error", "output_collision"))
            continue
        claimed.add(out)
        if out in done:
            settled.append(_row(key, out, "skipped", "output_exists"))
            continue
        mask_key = ""
        if opts.masks is not None:
            mask_key = mask_by_stem.get(stem(key), "")
            if not mask_key:
                settled.append(_row(key, out, "error", "missing_mask"))
                continue
        todo.append({"key": key, "mask_key": mask_key, "out_key": out})
    return todo, settled


def _init_ray():
    import ray

    from pipeline.cluster import connect

    connect()
    return ray


def run_infer(opts: InferOptions, storage_options=None) -> InferResult:
    """Run ``deepfill infer``; returns an InferResult (never raises for bad input rows)."""
    from pipeline import storage

    run_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    manifest_uri = storage.join(opts.output, MANIFEST_NAME)
    todo, settled = plan(opts, storage_options)
    previous = read_manifest(manifest_uri, storage_options)
    merged = dict(previous)
    errors = 0
    budget = math.inf if opts.max_errors < 0 else opts.max_errors
    for row in settled:
        row["run"] = run_id
        if row["status"] == "skipped":
            old = previous.get(row["key"])
            if old is not None and old.get("status") == "ok" and old.get("output") == row["output"]:
                continue  # keep the row of the run that wrote it
            log.info("skipped %s: %s", row["key"], row["reason"])
        else:
            errors += 1
            log.warning("skipped %s: %s", row["key"], row["reason"])
        merged[row["key"]] = row

    message, processed = "", 0
    try:
        if todo and errors <= budget:
            processed, errors = _run_actors(opts, todo, merged, errors, budget, run_id, storage_options)
    finally:
        write_manifest(manifest_uri, merged, storage_options)
    counts = {s: sum(1 for r in merged.values() if r["status"] == s) for s in STATUSES}
    if errors > budget:
        message = (f"error budget exceeded: {errors} bad inputs > --max-errors {opts.max_errors}; stopped early. "
                   f"Outputs already written are complete; see {MANIFEST_NAME} for reasons.")
        log.error(message)
        exit_code = 1
    else:
        exit_code = 0
        message = (f"done: {processed} processed this run, {errors} errors; manifest: ok {counts['ok']}, "
                   f"skipped {counts['skipped']}, error {counts['error']}")
        log.info(message)
    return InferResult(exit_code=exit_code, processed=processed, counts=counts, errors_this_run=errors,
                       manifest_uri=manifest_uri, message=message)


def _run_actors(opts: InferOptions, todo: list[dict], merged: dict, errors: int, budget: float, run_id: str,
                storage_options) -> tuple[int, int]:
    """The Ray Data part: stream manifest rows back; stop when the error budget is spent."""
    from jobs import serving
    from pipeline.progress import Progress

    ray = _init_ray()
    import ray.data

    generator_bytes, info = serving.fetch_checkpoint(opts.model)
    log.info("model %s (version %s), %d images to inpaint with %d actor(s)", info.get("model_name", "checkpoint"),
             info.get("model_version", "-"), len(todo), opts.num_actors)
    generator_ref = ray.put(generator_bytes)
    blocks = max(1, min(len(todo), max(2 * opts.num_actors, math.ceil(len(todo) / opts.batch_size))))
    ds = ray.data.from_items(todo, override_num_blocks=blocks)
    # I/O-bound fetch tasks reserve no CPU, so they run beside actors that hold every CPU of the cluster
    ds = ds.map_batches(read_inputs, batch_size=opts.batch_size, num_cpus=0,
                        compute=ray.data.TaskPoolStrategy(size=max(2, opts.num_actors)),
                        fn_kwargs={"images": opts.images, "masks": opts.masks, "storage_options": storage_options})
    ds = ds.map_batches(
        InpaintWorker,
        fn_constructor_args=(generator_ref,),
        fn_constructor_kwargs={
            "output": opts.output, "mask_preset": opts.mask_preset, "seed": opts.seed,
            "max_pixels": opts.max_pixels, "run": run_id, "storage_options": storage_options,
            "device": "cuda" if opts.use_gpu else "cpu", "threads": max(1, int(opts.num_cpus_per_actor)),
        },
        batch_size=opts.batch_size,
        compute=ray.data.ActorPoolStrategy(size=opts.num_actors),
        num_cpus=opts.num_cpus_per_actor,
        num_gpus=1 if opts.use_gpu else 0,
    )
    processed = 0
    with Progress("infer", total=len(todo), unit="images") as progress:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(batch["key"])):
                row = {name: batch[name][i].item() if hasattr(batch[name][i], "item") else batch[name][i]
                       for name in MANIFEST_FIELDS}
                row["key"], row["output"] = str(row["key"]), str(row["output"])
                row["status"], row["reason"], row["run"] = str(row["status"]), str(row["reason"]), str(row["run"])
                merged[row["key"]] = row
                processed += 1
                if row["status"] == "error":
                    errors += 1
                    log.warning("skipped %s: %s", row["key"], row["reason"])
            progress.update(len(batch["key"]))
            progress.set_postfix(f"{errors} errors")
            if errors > budget:
                break  # leaving the iterator stops the dataset; written outputs are complete files
    return processed, errors


# ---------------------------------------------------------------------------------------------------------
# CLI


def run(opts: InferOptions) -> int:
    """``deepfill infer`` once its options are resolved (``jobs.cli``): prints a JSON summary."""
    from pipeline.storage import redact

    result = run_infer(opts)
    print(json.dumps({"processed": result.processed, "errors": result.errors_this_run, **result.counts,
                      "manifest": redact(result.manifest_uri), "exit_code": result.exit_code}))
    return result.exit_code


if __name__ == "__main__":
    import sys

    from jobs.cli import main

    sys.exit(main(["infer", *sys.argv[1:]]))
