"""``deepfill evaluate``: score a model against OpenCV Telea and Navier-Stokes on the same deterministic masks.

    deepfill evaluate --images s3://bucket/heldout --model models:/deepfill@candidate --mask-preset thick_256 \\
        --seed 0 --output s3://bucket/reports/thick_256 [--max-images 100] [--size 256]

Inputs: every file under ``--images`` whose name ends in one of ``pipeline.images.IMAGE_SUFFIXES``, hidden
names (a part starting with ``.``) included, in sorted key order; the first ``--max-images`` of them. A key
that cannot be evaluated is skipped with a reason code, listed in report.md and metrics.json, and the rest
are still scored: ``unsafe_key`` (``pipeline.storage.unsafe_key`` refuses it as a relative path: ``..``,
``//``, control characters), ``read_failed`` (a broken link, an unreadable file, any OSError on read),
``too_large`` (over ``--max-bytes``, from the listed size, never read), ``resize_failed`` (OpenCV refused to
resize it), or any ``pipeline.images.ImageRejected`` reason (``not_an_image``, ``truncated``, ``corrupt``,
``decompression_bomb`` over ``--max-pixels``, ...). When no key is usable the job fails with one line and
writes nothing.

For each image:

1. decode (``pipeline.images.decode_image``: EXIF orientation, RGB), then fit to ``size x size``: centre crop
   the largest square, then resize it to ``size`` (INTER_AREA when shrinking, INTER_CUBIC when enlarging).
   Any size and aspect ratio is accepted: cropping first keeps the work to the decoded pixels (a 1 x 100000
   image is cropped to 1 x 1, then enlarged to a flat tile), so an extreme image costs no more memory than
   its decode, which ``--max-pixels`` bounds. ``size`` defaults to the preset's size (``thin_256`` -> 256,
   ``thick_512`` -> 512) and to 256 for ``box``, ``strokes``, ``mixed``, ``thin``, ``medium``, ``thick``.
2. mask: ``pipeline.masks.generate_mask(preset, size, size, mask_rng(seed, 0, key))`` (1 = hole), the same
   for every method and every run with the same seed.
3. inpaint with the model through ``models.inpaint_uint8`` (the one inference path), and with
   ``cv2.inpaint`` Telea and Navier-Stokes (inpaint radius 3 px) on the same masked image.
4. metrics per image and method (``models.metrics``, all on [0, 1]): l1, l2 (whole image), l1_hole, l2_hole
   (hole pixels only), psnr (whole image, dB), ssim (whole image), tv (of the output; the ground truth's TV is
   reported too as a reference). The mean over images is the headline.

Written under ``--output`` (which must not lie inside ``--images``: the report would be read back as input):
``report.md`` (mean table, definitions, skipped keys with reasons), ``metrics.json`` (config, model, means,
per-image values, ``skipped``: {key: reason}), ``metrics.csv`` (one row per image and method), ``grid.png``
(one row per image, at most ``--grid-rows``: masked input | ours | Telea | ground truth | attention map of
``models.visualize.flow_to_image``). ``--save-images`` also writes every method's output as
``images/<method>/<key>.png``.

MLflow: one run in experiment ``--experiment`` (default "deepfill-evaluate") with the settings as params, the
mean metrics as ``<method>/<metric>``, the report files as artifacts, and tags naming the model it judged
(``deepfill.model_ref`` and, for ``models:/`` refs, ``deepfill.model_name``, ``deepfill.model_version``,
``deepfill.model_run_id``). The judged model version gets the tag ``deepfill.eval.<preset>`` = the run id,
so each side links to the other. ``--no-mlflow`` skips all of it.
"""

from __future__ import annotations

import csv
import heapq
import io
import json
import logging
import math
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass

import numpy as np

from pipeline.config import DEFAULT_MAX_PIXELS
from pipeline.images import DEFAULT_MAX_BYTES

log = logging.getLogger(__name__)

METHODS = ("ours", "telea", "navier_stokes")
METRICS = ("l1", "l2", "l1_hole", "l2_hole", "psnr", "ssim", "tv")
DEFAULT_SIZE = 256
INPAINT_RADIUS = 3  # pixels; cv2.inpaint's neighbourhood for Telea and Navier-Stokes
REPORT_SKIPPED_ROWS = 200  # skipped keys listed in report.md; metrics.json lists them all


@dataclass
class EvaluateOptions:
    """Options of ``deepfill evaluate`` (each top-level field is also a flag: ``max_images`` -> ``--max-images``)."""

    images: str  # folder, file:// or s3:// prefix of the held-out images
    model: str  # models:/name@alias, models:/name/N, runs:/id/model, a generator file or checkpoint folder
    mask_preset: str  # the masks: box, strokes, mixed, thin_256, thick_512, ... (pipeline.masks)
    output: str  # folder or s3:// prefix for the report
    seed: int = 0  # mask seed: the same masks for every method and every run with the same seed
    max_images: int | None = None  # evaluate only the first N keys (sorted, skipped ones included); default all
    size: int | None = None  # evaluation size in pixels; default the preset's (thick_512 -> 512), else 256
    batch_size: int = 4  # images per forward pass of the model
    grid_rows: int = 8  # images shown in grid.png (at least 1)
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb limit: larger image headers are skipped
    max_bytes: str = f"{DEFAULT_MAX_BYTES // 2**20}MB"  # files larger than this are skipped unread (too_large): bytes or e.g. 64MB
    save_images: bool = False  # also write every method's output images under images/<method>/
    mlflow: bool = True  # log the report to MLflow, linked to the model version it judged
    experiment: str = "deepfill-evaluate"  # MLflow experiment name

    def __post_init__(self):
        from jobs.options import check_name
        from pipeline.masks import MASK_KINDS

        if self.mask_preset not in MASK_KINDS:
            raise ValueError(f"mask_preset must be one of {', '.join(MASK_KINDS)}, got {self.mask_preset!r}")
        if self.size is None:
            self.size = preset_size(self.mask_preset)
        if self.size < 16 or self.size % 8:
            raise ValueError(f"size must be a multiple of 8 and at least 16, got {self.size}")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {self.max_images}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.grid_rows < 1:
            raise ValueError(f"grid_rows must be >= 1, got {self.grid_rows}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")
        try:
            self.max_bytes_limit  # noqa: B018 - validates max_bytes
        except ValueError as err:
            raise ValueError(f"max_bytes: {err}") from None
        for name in ("images", "model", "output"):
            if not str(getattr(self, name)).strip():
                raise ValueError(f"{name} must not be empty")
        check_name(self.experiment, "experiment", forbid="")  # as train's tracking.experiment
        from pipeline import storage

        how = storage.overlap(self.output, self.images)
        if how in ("is", "is inside"):  # the report would be read back as an input
            raise ValueError(f"output must not be inside images (the report would be read back as an input): "
                             f"{storage.redact(self.output)!r} {how} {storage.redact(self.images)!r}")


    @property
    def max_bytes_limit(self) -> int:
        """``max_bytes`` in bytes."""
        from pipeline.config import parse_size

        return parse_size(self.max_bytes)

Options = EvaluateOptions  # what `deepfill evaluate` reads (jobs.cli)


def preset_size(preset: str) -> int:
    """``thin_256`` -> 256, ``thick_512`` -> 512; kinds without a size -> DEFAULT_SIZE."""
    m = re.search(r"_(\d+)$", preset)
    return int(m.group(1)) if m else DEFAULT_SIZE


def fit_square(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (size, size, 3): centre crop the largest square (side min(H, W)), then resize
    it to ``size`` (INTER_AREA when shrinking, INTER_CUBIC when enlarging). Cropping first means no array
    larger than the input or the output is made, whatever the aspect ratio."""
    import cv2

    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top : top + side, left : left + side]  # (side, side, 3)
    if side != size:
        interp = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
        square = cv2.resize(np.ascontiguousarray(square), (size, size), interpolation=interp)
    return np.ascontiguousarray(square)


def classical_inpaint(image: np.ndarray, mask: np.ndarray, method: str) -> np.ndarray:
    """OpenCV baseline on uint8 (H, W, 3) RGB with mask (H, W) 1 = hole -> uint8 (H, W, 3) RGB."""
    import cv2

    flags = {"telea": cv2.INPAINT_TELEA, "navier_stokes": cv2.INPAINT_NS}
    if method not in flags:
        raise ValueError(f"unknown classical inpainting method {method}")
    bgr = np.ascontiguousarray(image[..., ::-1])
    out = cv2.inpaint(bgr, (mask > 0).astype(np.uint8) * 255, INPAINT_RADIUS, flags[method])
    return np.ascontiguousarray(out[..., ::-1])


def score(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """All metrics of one uint8 (H, W, 3) prediction against the ground truth; mask (H, W) 1 = hole."""
    from models import metrics

    return {
        "l1": metrics.l1(pred, truth),
        "l2": metrics.l2(pred, truth),
        "l1_hole": metrics.l1(pred, truth, mask),
        "l2_hole": metrics.l2(pred, truth, mask),
        "psnr": metrics.psnr(pred, truth),
        "ssim": metrics.ssim(pred, truth),
        "tv": metrics.tv(pred),
    }


def _fmt(metric: str, value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if metric in ("l1", "l2", "l1_hole", "l2_hole", "tv"):
        return f"{100 * value:.2f}%"
    if metric == "psnr":
        return f"{value:.2f}"
    return f"{value:.4f}"


def _md_key(key: str) -> str:
    """A key as a markdown table cell: control characters escaped (as in JSON), ``|`` and backticks defused."""
    text = json.dumps(key, ensure_ascii=False)[1:-1].replace("`", "'").replace("|", "\\|")
    return f"`{text}`"


def _skipped_markdown(skipped: dict[str, str]) -> list[str]:
    """report.md's section on skipped keys: the count per reason, then the keys (at most REPORT_SKIPPED_ROWS)."""
    if not skipped:
        return []
    counts = Counter(skipped.values())
    lines = ["## Skipped", "", ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items())) + ".", "",
             "| key | reason |", "|---|---|"]
    for key in sorted(skipped)[:REPORT_SKIPPED_ROWS]:
        lines.append(f"| {_md_key(key)} | {skipped[key]} |")
    if len(skipped) > REPORT_SKIPPED_ROWS:
        lines.append(f"\n... and {len(skipped) - REPORT_SKIPPED_ROWS} more, all listed in metrics.json.")
    return [*lines, ""]


def report_markdown(opts: EvaluateOptions, model_info: dict, means: dict, truth_tv: float, count: int,
                    skipped: dict[str, str]) -> str:
    from pipeline.storage import redact

    header = "| method | " + " | ".join(METRICS) + " |"
    lines = [
        f"# Inpainting evaluation: {opts.mask_preset} masks, seed {opts.seed}",
        "",
        f"Model: `{redact(opts.model)}`"
        + (f" (registered {model_info['model_name']} version {model_info['model_version']})"
           if "model_version" in model_info else ""),
        f"Images: {count} evaluated at {opts.size}x{opts.size} (centre square, resized)"
        + (f", {len(skipped)} skipped (listed below with their reasons)" if skipped else "") + ".",
        "",
        header,
        "|" + "---|" * (len(METRICS) + 1),
    ]
    for method in METHODS:
        lines.append(f"| {method} | " + " | ".join(_fmt(m, means[method][m]) for m in METRICS) + " |")
    lines += [
        "",
        f"Ground truth TV: {_fmt('tv', truth_tv)}.",
        "",
        "Definitions (images on [0, 1], means over pixels and channels, then over images): l1 = mean |x - y|; "
        "l2 = mean (x - y)^2; *_hole = the same over hole pixels only; psnr = 10 log10(1 / l2) in dB; "
        "ssim = Gaussian-window SSIM (Wang et al. 2004, sigma 1.5, K1 0.01, K2 0.03), mean over channels; "
        "tv = mean |horizontal neighbour difference| + mean |vertical neighbour difference| of the output. "
        "Telea and Navier-Stokes are OpenCV's cv2.inpaint with radius "
        f"{INPAINT_RADIUS}. Pixel metrics barely separate methods; look at grid.png too.",
        "",
        "![grid](grid.png)",
        "",
        "Grid columns: masked input | ours | Telea | ground truth | attention map.",
        "",
        *_skipped_markdown(skipped),
    ]
    return "\n".join(lines)


def evaluate(opts: EvaluateOptions) -> dict:
    """Run the evaluation; writes the report under opts.output and returns the metrics.json content."""
    import models
    from jobs import serving
    from models import visualize
    from pipeline import storage
    from pipeline.images import IMAGE_SUFFIXES, encode_png
    from pipeline.masks import generate_mask, mask_rng
    from pipeline.progress import Progress

    size = int(opts.size)
    listed = (e for e in storage.iter_entries(opts.images, hidden=True) if e.key.lower().endswith(IMAGE_SUFFIXES))
    if opts.max_images is not None:  # the first N in key order, without holding the whole listing
        entries = heapq.nsmallest(opts.max_images, listed, key=lambda e: e.key)
    else:
        entries = sorted(listed, key=lambda e: e.key)
    if not entries:
        raise ValueError(f"no images under {storage.redact(opts.images)} "
                         f"(names ending in {', '.join(IMAGE_SUFFIXES)})")
    generator, model_info = serving.load_generator(opts.model)

    truths, masks, used, skipped = [], [], [], {}
    for entry in entries:
        key = entry.key
        try:
            truths.append(_load_truth(opts, entry, size))
        except _Skip as err:
            skipped[key] = err.reason
            log.warning("skipped %r: %s", key, storage.redact(str(err)))
            continue
        masks.append(generate_mask(opts.mask_preset, size, size, mask_rng(opts.seed, 0, key)))
        used.append(key)
    if not used:
        counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(Counter(skipped.values()).items()))
        raise ValueError(f"no usable images under {storage.redact(opts.images)}: "
                         f"all {len(skipped)} skipped ({counts})")
    truths_arr, masks_arr = np.stack(truths), np.stack(masks)  # (N, S, S, 3), (N, S, S)

    outputs = {m: [] for m in METHODS}
    attention = []
    with Progress("evaluate", total=len(used), unit="images") as progress:
        for start in range(0, len(used), opts.batch_size):
            sl = slice(start, start + opts.batch_size)
            filled, offsets = models.inpaint_uint8(generator, truths_arr[sl], masks_arr[sl][..., None],
                                                   return_offsets=True)
            outputs["ours"].extend(filled)
            attention.extend(visualize.upsample_nearest(visualize.flow_to_image(offsets), size, size))
            for method in ("telea", "navier_stokes"):
                outputs[method].extend(classical_inpaint(t, m, method) for t, m in zip(truths_arr[sl], masks_arr[sl]))
            progress.update(len(filled))

    from models import metrics

    per_image = []
    for i, key in enumerate(used):
        entry = {"key": key, "hole_fraction": float(masks_arr[i].mean()), "truth_tv": metrics.tv(truths_arr[i])}
        for method in METHODS:
            entry[method] = score(outputs[method][i], truths_arr[i], masks_arr[i])
        per_image.append(entry)
    means = {method: {m: float(np.mean([e[method][m] for e in per_image])) for m in METRICS} for method in METHODS}
    truth_tv = float(np.mean([e["truth_tv"] for e in per_image]))

    result = {
        "config": {"images": storage.redact(opts.images), "model": storage.redact(opts.model),
                   "mask_preset": opts.mask_preset, "seed": opts.seed, "size": size,
                   "max_images": opts.max_images, "max_pixels": opts.max_pixels, "max_bytes": opts.max_bytes,
                   "inpaint_radius": INPAINT_RADIUS},
        "model": {k: v for k, v in model_info.items() if k != "ref"},
        "count": len(used),
        "skipped": skipped,
        "mean": means,
        "truth_tv": truth_tv,
        "per_image": per_image,
    }

    files: dict[str, bytes] = {
        "metrics.json": json.dumps(result, indent=2).encode(),
        "metrics.csv": _csv(per_image),
        "report.md": report_markdown(opts, model_info, means, truth_tv, len(used), skipped).encode(),
    }
    shown = slice(0, min(opts.grid_rows, len(used)))
    if shown.stop:
        columns = [visualize.masked_input(truths_arr[shown], masks_arr[shown]), np.stack(outputs["ours"][shown]),
                   np.stack(outputs["telea"][shown]), truths_arr[shown], np.stack(attention[shown])]
        files["grid.png"] = encode_png(visualize.picture_grid(columns, gap=4, border=4))
    if opts.save_images:
        for method in (*METHODS, "truth"):
            images = truths_arr if method == "truth" else outputs[method]
            for key, img in zip(used, images):
                files[f"images/{method}/{key.rsplit('.', 1)[0]}.png"] = encode_png(img)
    for name, data in files.items():
        storage.write_bytes_atomic(storage.join(opts.output, name), data)
    log.info("evaluated %d images: ours psnr %.2f dB, telea %.2f dB, navier_stokes %.2f dB", len(used),
             means["ours"]["psnr"], means["telea"]["psnr"], means["navier_stokes"]["psnr"])
    if opts.mlflow:
        result["mlflow_run_id"] = _log_to_mlflow(opts, model_info, means, truth_tv, len(used), len(skipped),
                                                 {k: v for k, v in files.items() if not k.startswith("images/")})
    return result


class _Skip(Exception):
    """A key that cannot be evaluated; ``reason`` is its code in the report."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


def _load_truth(opts: EvaluateOptions, entry, size: int) -> np.ndarray:
    """One listed entry -> its ground truth, uint8 (size, size, 3) RGB; raises _Skip with the reason."""
    import cv2

    from pipeline import storage
    from pipeline.images import ImageRejected, decode_image

    problem = storage.unsafe_key(entry.key)
    if problem:
        raise _Skip("unsafe_key", problem)
    if entry.size < 0:  # the listing could not stat it: a broken link, a vanished or unreadable file
        raise _Skip("read_failed", "could not stat it")
    if entry.size > opts.max_bytes_limit:
        raise _Skip("too_large", f"{entry.size} bytes is over max_bytes {opts.max_bytes}")
    try:
        data = storage.read_bytes(storage.join(opts.images, entry.key))
    except OSError as err:  # a directory or link behind an image name, permissions, a vanished object
        raise _Skip("read_failed", f"{type(err).__name__}: {err}") from None
    try:
        image = decode_image(data, max_pixels=opts.max_pixels, max_bytes=opts.max_bytes_limit)
    except ImageRejected as err:
        raise _Skip(err.reason, err.detail) from None
    try:
        return fit_square(image, size)
    except cv2.error as err:
        raise _Skip("resize_failed", str(err).strip().splitlines()[-1]) from None


def _csv(per_image: list[dict]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["key", "method", "hole_fraction", *METRICS])
    for e in per_image:
        for method in METHODS:
            writer.writerow([e["key"], method, f"{e['hole_fraction']:.6f}", *(repr(e[method][m]) for m in METRICS)])
    return buf.getvalue().encode()


def _log_to_mlflow(opts: EvaluateOptions, model_info: dict, means: dict, truth_tv: float, count: int,
                   num_skipped: int, files: dict[str, bytes]) -> str:
    """One MLflow run with params, mean metrics, report artifacts and tags linking it to the model version."""
    import mlflow

    from pipeline.storage import redact

    mlflow.set_experiment(opts.experiment)
    tags = {"deepfill.job": "evaluate", "deepfill.model_ref": redact(opts.model)}
    for key in ("model_name", "model_version", "run_id"):
        if key in model_info:
            tags["deepfill." + ("model_run_id" if key == "run_id" else key)] = str(model_info[key])
    with mlflow.start_run(run_name=f"evaluate-{opts.mask_preset}", tags=tags) as run:
        mlflow.log_params({"mask_preset": opts.mask_preset, "seed": opts.seed, "size": opts.size,
                           "num_images": count, "num_skipped": num_skipped, "images": redact(opts.images),
                           "inpaint_radius": INPAINT_RADIUS})
        values = {f"{method}/{m}": v for method in METHODS for m, v in means[method].items() if math.isfinite(v)}
        values["truth/tv"] = truth_tv
        mlflow.log_metrics(values)
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
            mlflow.log_artifacts(tmp, artifact_path="report")
        if "model_version" in model_info:
            mlflow.MlflowClient().set_model_version_tag(
                model_info["model_name"], model_info["model_version"], f"deepfill.eval.{opts.mask_preset}",
                run.info.run_id)
        return run.info.run_id


def run(opts: EvaluateOptions) -> int:
    """``deepfill evaluate`` once its options are resolved (``jobs.cli``): prints a JSON summary."""
    from pipeline.storage import redact

    result = evaluate(opts)
    print(json.dumps({"count": result["count"], "skipped": len(result["skipped"]), "mean": result["mean"],
                      "output": redact(opts.output)}))
    return 0


if __name__ == "__main__":
    import sys

    from jobs.cli import main

    sys.exit(main(["evaluate", *sys.argv[1:]]))
