"""``deepfill evaluate``: score models against OpenCV Telea and Navier-Stokes on the same deterministic masks.

    deepfill evaluate --images s3://bucket/heldout --model models:/deepfill@candidate --mask-preset thick_256 \\
        --seed 0 --output s3://bucket/reports/thick_256 [--max-images 100] [--size 256]
    deepfill evaluate --images heldout --model models:/deepfill/3,models:/deepfill/4 --mask-preset box --output r
    deepfill evaluate --images heldout --sweep <parent run id of a deepfill sweep> --mask-preset box --output r

Models: ``--model`` takes one reference or several (``A,B``; once ``jobs.options`` makes list flags repeatable,
also ``--model A --model B``): ``models:/name@alias``, ``models:/name/N``, ``runs:/<id>/model``, a generator
file or a checkpoint folder. ``--sweep RUN_ID`` adds every finished arm of that ``deepfill sweep`` (its child
runs tagged ``deepfill.job=sweep-arm``, in arm order): the model version each registered, else its checkpoint.
Each model is a row of the report, named by ``--labels`` (one per model, sweep arms first), else by its arm
(``deepfill.arm``, on the run or the model version), else by its registered name and version, else its file
name. With exactly one model given by ``--model`` its row is ``ours``, as before.

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
3. inpaint with each model through ``models.inpaint_uint8`` (the one inference path; one model in memory at
   a time), and with ``cv2.inpaint`` Telea and Navier-Stokes (inpaint radius 3 px) on the same masked image.
4. metrics per image and method (``score``, all on [0, 1]), whole image and hole only: l1, l2, psnr, ssim,
   tv and l1_hole, l2_hole, psnr_hole, ssim_hole, tv_hole (``jobs.report`` defines each; the ground truth's
   TV is reported too as a reference). The mean over images is the headline, with a bootstrap interval
   (``--bootstrap`` resamples of the images, ``--bootstrap-seed``; 0 resamples: no intervals).

Written under ``--output`` (which must not lie inside ``--images``: the report would be read back as input):
``report.md`` (the models, a hole table and a whole-image table with a row per method and ``mean [interval]``
cells, definitions, skipped keys with reasons), ``report.html`` (the same as one self-contained page, every
picture inlined), ``metrics.json`` (config, models, means, intervals, per-image values, ``skipped``:
{key: reason}), ``metrics.csv`` (one row per image and method: key, model, label, hole_fraction, metrics),
``grid.png`` (one row per image, at most ``--grid-rows``: masked input | each model | Telea | ground truth |
each model's attention map (``models.visualize.flow_to_image``)), ``curves/<metric>.png`` (the training
curves: losses and validation metrics against step, a line per model, from each model's MLflow run; models
without a run have none). ``--save-images`` also writes every method's output as
``images/<method>/<key>.png``.

MLflow: one run in experiment ``--experiment`` (default "deepfill-evaluate") with the settings as params, the
mean metrics as ``<method>/<metric>`` (and ``<method>/<metric>.ci_low`` / ``.ci_high``), the report files as
artifacts under ``report/``, and tags naming what it judged. With one model the run carries its tags
(``deepfill.model_ref`` and, for ``models:/`` refs, ``deepfill.model_name``, ``deepfill.model_version``,
``deepfill.model_run_id``); with several, the run is a parent with one child run per model carrying them
and that model's means. ``--sweep`` runs are tagged ``deepfill.sweep_run_id``. The judged model version gets
the tag ``deepfill.eval.<preset>`` = the run (or child run) id, so each side links to the other.
``--no-mlflow`` writes nothing to MLflow (``models:/`` refs, ``--sweep`` and the curves still read it).
``--tracking-uri`` names the MLflow server (default MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the cwd).
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
import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from jobs.report import METRICS, md_key
from pipeline.config import DEFAULT_MAX_PIXELS
from pipeline.images import DEFAULT_MAX_BYTES

log = logging.getLogger(__name__)

BASELINES = ("telea", "navier_stokes")  # the classical methods every model is compared with
METHODS = ("ours", *BASELINES)  # the methods of a one-model evaluation
DEFAULT_SIZE = 256
INPAINT_RADIUS = 3  # pixels; cv2.inpaint's neighbourhood for Telea and Navier-Stokes
_md_key = md_key  # report.md's key cells (jobs.report)
_RUN_ID = re.compile(r"[0-9A-Za-z_-]+")


@dataclass
class EvaluateOptions:
    """Options of ``deepfill evaluate`` (each top-level field is also a flag: ``max_images`` -> ``--max-images``)."""

    images: str  # folder, file:// or s3:// prefix of the held-out images
    mask_preset: str  # the masks: box, strokes, mixed, thin_256, thick_512, ... (pipeline.masks)
    output: str  # folder or s3:// prefix for the report
    # the models to compare: models:/name@alias, models:/name/N, runs:/id/model, a generator file or checkpoint
    #    folder; several as A,B (a row each in the report)
    model: list[str] = field(default_factory=list)
    sweep: str = ""  # MLflow run id of a `deepfill sweep`: its finished arms join the comparison (before --model's)
    labels: list[str] = field(default_factory=list)  # row names, one per model (sweep arms first); default: arm or name
    seed: int = 0  # mask seed: the same masks for every method and every run with the same seed
    max_images: int | None = None  # evaluate only the first N keys (sorted, skipped ones included); default all
    size: int | None = None  # evaluation size in pixels; default the preset's (thick_512 -> 512), else 256
    batch_size: int = 4  # images per forward pass of the model
    grid_rows: int = 8  # images shown in grid.png (at least 1)
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb limit: larger image headers are skipped
    max_bytes: str = f"{DEFAULT_MAX_BYTES // 2**20}MB"  # files larger than this are skipped unread (too_large): bytes or e.g. 64MB
    save_images: bool = False  # also write every method's output images under images/<method>/
    bootstrap: int = 1000  # bootstrap resamples of the images for each mean's 95% interval; 0 = no intervals
    bootstrap_seed: int = 0  # seed of the bootstrap resamples
    curves: bool = True  # training curves (losses, validation) from each model's MLflow run, as PNG plots
    mlflow: bool = True  # log the report to MLflow, linked to the model versions it judged
    experiment: str = "deepfill-evaluate"  # MLflow experiment name
    tracking_uri: str | None = None  # MLflow tracking URI; default MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here

    def __post_init__(self):
        from jobs.options import check_name
        from pipeline.masks import MASK_KINDS

        if isinstance(self.model, str):  # EvaluateOptions(model="m.pt"): one model
            self.model = [self.model]
        self.model, self.labels = list(self.model), list(self.labels)
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
        if self.bootstrap < 0:
            raise ValueError(f"bootstrap must be >= 0 (0 = no intervals), got {self.bootstrap}")
        try:
            self.max_bytes_limit  # noqa: B018 - validates max_bytes
        except ValueError as err:
            raise ValueError(f"max_bytes: {err}") from None
        for name in ("images", "output"):
            if not str(getattr(self, name)).strip():
                raise ValueError(f"{name} must not be empty")
        if not self.model and not self.sweep:
            raise ValueError("model must not be empty: give --model REF (several as A,B) or --sweep RUN_ID")
        if any(not str(ref).strip() for ref in self.model):
            raise ValueError(f"model must not hold an empty reference, got {self.model!r}")
        if self.sweep and not _RUN_ID.fullmatch(self.sweep):
            raise ValueError(f"sweep must be an MLflow run id (letters, digits, '_', '-'), got {self.sweep!r}")
        if any(not str(label).strip() for label in self.labels) or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct and non-empty, got {self.labels!r}")
        if self.labels and not self.sweep and len(self.labels) != len(self.model):
            raise ValueError(f"labels: {len(self.labels)} given for {len(self.model)} model(s); give one per model")
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


def tv_hole(image: np.ndarray, mask: np.ndarray) -> float:
    """TV of uint8 (H, W, 3) ``image`` on [0, 1] over the hole (mask (H, W), 1 = hole): mean |difference| of
    the horizontal neighbour pairs with at least one hole pixel, plus the same for vertical pairs (the fill
    and its seam). NaN for an image without a hole."""
    x = image.astype(np.float64) / 255.0  # (H, W, 3)
    m = mask > 0  # (H, W)
    if not m.any():
        return math.nan
    h_pairs, v_pairs = m[:, 1:] | m[:, :-1], m[1:] | m[:-1]  # (H, W-1), (H-1, W)
    dh = np.abs(x[:, 1:] - x[:, :-1])[h_pairs].mean() if h_pairs.any() else 0.0
    dv = np.abs(x[1:] - x[:-1])[v_pairs].mean() if v_pairs.any() else 0.0
    return float(dh + dv)


def score(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Every metric of ``jobs.report.METRICS`` for one uint8 (H, W, 3) prediction against the ground truth;
    mask (H, W) 1 = hole. ssim is scikit-image's Gaussian SSIM (what ``models.metrics.ssim`` matches), its
    map averaged over the valid window positions (ssim) or over the hole pixels (ssim_hole)."""
    from skimage.metrics import structural_similarity

    from models import metrics

    whole, ssim_map = structural_similarity(
        pred.astype(np.float64) / 255.0, truth.astype(np.float64) / 255.0, gaussian_weights=True,
        sigma=metrics.SSIM_SIGMA, use_sample_covariance=False, data_range=1.0, channel_axis=-1, full=True)
    hole = mask > 0
    return {
        "l1": metrics.l1(pred, truth),
        "l2": metrics.l2(pred, truth),
        "psnr": metrics.psnr(pred, truth),
        "ssim": float(whole),
        "tv": metrics.tv(pred),
        "l1_hole": metrics.l1(pred, truth, mask),
        "l2_hole": metrics.l2(pred, truth, mask),
        "psnr_hole": metrics.psnr(pred, truth, mask),
        "ssim_hole": float(ssim_map.mean(axis=-1)[hole].mean()) if hole.any() else math.nan,
        "tv_hole": tv_hole(pred, mask),
    }


# ----------------------------------------------------------------------------------------- the models

@dataclass
class ModelSpec:
    """One model of the comparison, before and after it is loaded."""

    ref: str  # what the user (or the sweep) named: models:/..., runs:/..., a file or folder
    facts: dict = field(default_factory=dict)  # model_name, model_version, run_id, model_uri, arm, arm_index, step
    label: str = ""  # its row in the report
    key: str = ""  # its identifier in files and MLflow metric names (``jobs.report.Row.key``)

    @property
    def load_ref(self) -> str:
        """The reference to load: the resolved version (``models:/name/N``) for an alias, so that the model
        scored is the version the report names even if the alias moves meanwhile."""
        return self.facts.get("model_uri") or self.ref


def sweep_models(parent_run_id: str) -> list[ModelSpec]:
    """The arms of a ``deepfill sweep`` (``jobs.sweep``): its child runs tagged ``deepfill.job=sweep-arm``
    that FINISHED, in arm order; each one's newest registered version, else the checkpoint the sweep
    recorded (tag ``deepfill.checkpoint``), else ``runs:/<id>/model``. Raises ValueError for a run id that
    does not exist or has no finished arm."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        parent = client.get_run(parent_run_id)
    except MlflowException as err:
        raise ValueError(f"sweep: no MLflow run {parent_run_id} ({err.error_code})") from None
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=10_000)
    arms = [r for r in runs if r.data.tags.get("deepfill.job") == "sweep-arm"]
    unfinished = [r.data.tags.get("deepfill.arm", r.info.run_id) for r in arms if r.info.status != "FINISHED"]
    if unfinished:
        log.warning("sweep %s: %d arm(s) did not finish and are left out: %s", parent_run_id, len(unfinished),
                    "; ".join(unfinished))
    arms = sorted((r for r in arms if r.info.status == "FINISHED"),
                  key=lambda r: int(r.data.tags.get("deepfill.arm_index", 0)))
    if not arms:
        raise ValueError(f"sweep: run {parent_run_id} has no finished arm (child runs tagged deepfill.job=sweep-arm)")
    specs = []
    for run in arms:
        run_id, tags = run.info.run_id, run.data.tags
        facts = {"run_id": run_id, "arm": tags.get("deepfill.arm", ""), "arm_index": tags.get("deepfill.arm_index")}
        versions = client.search_model_versions(f"run_id = '{run_id}'")
        if versions:
            mv = max(versions, key=lambda v: int(v.version))
            ref = f"models:/{mv.name}/{mv.version}"
            facts.update(model_name=mv.name, model_version=str(mv.version), model_uri=ref)
        else:
            ref = tags.get("deepfill.checkpoint") or f"runs:/{run_id}/model"
        specs.append(ModelSpec(ref, facts))
    return specs


def _describe(ref: str) -> dict:
    """Registry facts of a ``models:/`` ref (version, run, the ``deepfill.arm`` tag of a sweep's version),
    the run of a ``runs:/`` ref; nothing for files."""
    if ref.startswith("models:/"):
        from mlflow import MlflowClient

        from jobs import serving

        facts = serving.resolve_model_version(ref)
        tags = MlflowClient().get_model_version(facts["model_name"], facts["model_version"]).tags or {}
        if tags.get("deepfill.arm"):
            facts["arm"] = tags["deepfill.arm"]
        return facts
    if ref.startswith("runs:/"):
        return {"run_id": ref[len("runs:/"):].split("/", 1)[0]}
    return {}


def _default_label(spec: ModelSpec) -> str:
    facts = spec.facts
    if facts.get("arm"):
        return facts["arm"]
    if "model_version" in facts:
        return f"{facts['model_name']} v{facts['model_version']}"
    if spec.ref.startswith("runs:/"):
        return f"run {facts['run_id'][:8]}"
    from pipeline.storage import redact

    return redact(spec.ref).rstrip("/").rsplit("/", 1)[-1] or spec.ref


def slug(text: str) -> str:
    """``gan.loss=dcgan,model.attention=none`` -> ``gan.loss-dcgan_model.attention-none``: letters, digits,
    '.', '-' and '_' only (an MLflow metric-name and file-name part)."""
    text = text.replace("=", "-").replace(",", "_")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._") or "model"


def model_specs(opts: EvaluateOptions) -> list[ModelSpec]:
    """The models to compare, in report order (sweep arms, then ``--model``), with labels and keys. One
    ``--model`` alone is ``ours``. Raises ValueError when ``--labels`` does not give one per model."""
    specs = sweep_models(opts.sweep) if opts.sweep else []
    specs += [ModelSpec(ref, _describe(ref)) for ref in opts.model]
    if opts.labels and len(opts.labels) != len(specs):
        raise ValueError(f"labels: {len(opts.labels)} given for {len(specs)} model(s); give one per model")
    if len(specs) == 1 and not opts.sweep and not opts.labels:
        specs[0].label = specs[0].key = "ours"
        return specs
    taken = {*BASELINES, "truth"}
    seen_labels: Counter = Counter()
    for i, spec in enumerate(specs):
        label = opts.labels[i] if opts.labels else _default_label(spec)
        seen_labels[label] += 1
        spec.label = label if seen_labels[label] == 1 else f"{label} ({seen_labels[label]})"
        key, n = slug(spec.label), 1
        while key in taken:
            n += 1
            key = f"{slug(spec.label)}-{n}"
        taken.add(key)
        spec.key = key
    return specs


# ----------------------------------------------------------------------------------------- the job

def evaluate(opts: EvaluateOptions) -> dict:
    """Run the evaluation; writes the report under opts.output and returns the metrics.json content (plus
    ``mlflow_run_id`` when logged)."""
    import models
    from jobs import report, serving
    from models import metrics, visualize
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
    if opts.tracking_uri:
        import mlflow

        from jobs.tracking import resolve_tracking_uri

        mlflow.set_tracking_uri(resolve_tracking_uri(opts.tracking_uri))
    specs = model_specs(opts)

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
    shown = min(opts.grid_rows, len(used))
    keys = [s.key for s in specs] + list(BASELINES)

    def save(method: str, key: str, image: np.ndarray) -> None:
        if opts.save_images:
            storage.write_bytes_atomic(storage.join(opts.output, f"images/{method}/{key.rsplit('.', 1)[0]}.png"),
                                       encode_png(image))

    scores = {k: [] for k in keys}  # method key -> per-image score dicts, in `used` order
    pictures: dict[str, list] = {k: [] for k in keys}  # method key -> the first `shown` outputs
    attention: dict[str, list] = {s.key: [] for s in specs}
    with Progress("evaluate", total=len(used) * (len(specs) + 1), unit="images") as progress:
        for i, key in enumerate(used):
            for method in BASELINES:
                out = classical_inpaint(truths_arr[i], masks_arr[i], method)
                scores[method].append(score(out, truths_arr[i], masks_arr[i]))
                if i < shown:
                    pictures[method].append(out)
                save(method, key, out)
            save("truth", key, truths_arr[i])
            progress.update(1)
        for spec in specs:  # one generator in memory at a time
            generator, info = serving.load_generator(spec.load_ref)
            spec.facts["step"] = info.get("step", 0)
            for start in range(0, len(used), opts.batch_size):
                sl = slice(start, start + opts.batch_size)
                filled, offsets = models.inpaint_uint8(generator, truths_arr[sl], masks_arr[sl][..., None],
                                                       return_offsets=True)
                flows = visualize.upsample_nearest(visualize.flow_to_image(offsets), size, size)
                for j, out in enumerate(filled):
                    i = start + j
                    scores[spec.key].append(score(out, truths_arr[i], masks_arr[i]))
                    if i < shown:
                        pictures[spec.key].append(out)
                        attention[spec.key].append(flows[j])
                    save(spec.key, used[i], out)
                progress.update(len(filled))
            del generator

    per_image = []
    for i, key in enumerate(used):
        entry = {"key": key, "hole_fraction": float(masks_arr[i].mean()), "truth_tv": metrics.tv(truths_arr[i]),
                 "truth_tv_hole": tv_hole(truths_arr[i], masks_arr[i])}
        entry.update({k: scores[k][i] for k in keys})
        per_image.append(entry)
    columns = np.array([[e[k][m] for k in keys for m in METRICS] for e in per_image])  # (N, methods x metrics)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a hole metric of images without holes: NaN
        column_means = np.nanmean(columns, axis=0)  # the mean over the images where the metric is defined
    means = {k: {m: float(column_means[a * len(METRICS) + b]) for b, m in enumerate(METRICS)}
             for a, k in enumerate(keys)}
    intervals: dict = {}
    if opts.bootstrap:
        bounds = report.percentile_interval(report.bootstrap_means(columns, opts.bootstrap, opts.bootstrap_seed))
        intervals = {k: {m: (float(bounds[a * len(METRICS) + b][0]), float(bounds[a * len(METRICS) + b][1]))
                         for b, m in enumerate(METRICS)} for a, k in enumerate(keys)}
    holes = [e["truth_tv_hole"] for e in per_image if math.isfinite(e["truth_tv_hole"])]
    truth = {"tv": float(np.mean([e["truth_tv"] for e in per_image])),
             "tv_hole": float(np.mean(holes)) if holes else math.nan}

    rows = [report.Row(s.key, s.label, "model", storage.redact(s.ref),
                       {k: v for k, v in s.facts.items() if v not in (None, "")}) for s in specs]
    rows += [report.Row(m, m, "classical") for m in BASELINES]
    files: dict[str, bytes] = {}
    curves, notes = {}, []
    if opts.curves:
        curves, notes = _curves(specs)
        files.update(curves)
    grid_columns = ["masked input", *(s.label for s in specs), "Telea", "ground truth",
                    *(f"attention ({s.label})" if len(specs) > 1 else "attention map" for s in specs)]
    if shown:
        columns_ = [visualize.masked_input(truths_arr[:shown], masks_arr[:shown]),
                    *(np.stack(pictures[s.key]) for s in specs), np.stack(pictures["telea"]), truths_arr[:shown],
                    *(np.stack(attention[s.key]) for s in specs)]
        files["grid.png"] = encode_png(visualize.picture_grid(columns_, gap=4, border=4))
    comparison = report.Comparison(
        mask_preset=opts.mask_preset, seed=opts.seed, size=size, count=len(used), rows=rows, means=means,
        intervals=intervals, truth=truth, skipped=skipped, resamples=opts.bootstrap, inpaint_radius=INPAINT_RADIUS,
        grid_columns=grid_columns, curves=list(curves), notes=notes)

    result = {
        "config": {"images": storage.redact(opts.images), "model": [storage.redact(m) for m in opts.model],
                   "sweep": opts.sweep, "mask_preset": opts.mask_preset, "seed": opts.seed, "size": size,
                   "max_images": opts.max_images, "max_pixels": opts.max_pixels, "max_bytes": opts.max_bytes,
                   "inpaint_radius": INPAINT_RADIUS, "bootstrap": opts.bootstrap,
                   "bootstrap_seed": opts.bootstrap_seed},
        "methods": [{"key": r.key, "label": r.label, "kind": r.kind, "ref": r.ref, **r.facts} for r in rows],
        "count": len(used),
        "skipped": skipped,
        "mean": means,
        "ci95": {k: {m: list(v) for m, v in per.items()} for k, per in intervals.items()},
        "truth_tv": truth["tv"],
        "truth_tv_hole": truth["tv_hole"],
        "per_image": per_image,
    }
    if len(specs) == 1:
        result["model"] = {k: v for k, v in specs[0].facts.items() if k not in ("ref",)}
    files["metrics.json"] = json.dumps(result, indent=2).encode()
    files["metrics.csv"] = _csv(per_image, rows)
    files["report.md"] = report.markdown(comparison).encode()
    files["report.html"] = report.html_page(comparison, files).encode()
    for name, data in files.items():
        storage.write_bytes_atomic(storage.join(opts.output, name), data)
    log.info("evaluated %d images: %s", len(used),
             ", ".join(f"{r.label} psnr {means[r.key]['psnr']:.2f} dB" for r in rows))
    if opts.mlflow:
        result["mlflow_run_id"] = _log_to_mlflow(opts, specs, means, intervals, truth, len(used), len(skipped), files)
    return result


def _curves(specs: list[ModelSpec]) -> tuple[dict[str, bytes], list[str]]:
    """The training-curve plots (``jobs.report.plot_curves``) of the models that name an MLflow run, and a
    note naming those without one."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from jobs import report

    client, histories, missing = MlflowClient(), {}, []
    for spec in specs:
        run_id = spec.facts.get("run_id")
        if not run_id:
            missing.append(spec.label)
            continue
        try:
            names = client.get_run(run_id).data.metrics
        except MlflowException as err:
            log.warning("no training curves for %s: MLflow run %s: %s", spec.label, run_id, err.error_code)
            missing.append(spec.label)
            continue
        histories[spec.label] = {name: [(m.step, m.value) for m in client.get_metric_history(run_id, name)]
                                 for name in report.curve_metrics(names)}
    plots = report.plot_curves(histories) if any(histories.values()) else {}
    notes = ([f"No training curves for {', '.join(missing)}: no MLflow run (a file or folder reference)."]
             if missing else [])
    return plots, notes


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


def _csv(per_image: list[dict], rows) -> bytes:
    """metrics.csv: one row per image and method (key, model, label, hole_fraction, every metric)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["key", "model", "label", "hole_fraction", *METRICS])
    for e in per_image:
        for row in rows:
            writer.writerow([e["key"], row.key, row.label, f"{e['hole_fraction']:.6f}",
                             *(repr(e[row.key][m]) for m in METRICS)])
    return buf.getvalue().encode()


def _metric_values(key: str, means: dict, intervals: dict, prefix: str) -> dict[str, float]:
    """``{prefix}{metric}`` means and ``.ci_low`` / ``.ci_high`` bounds of one method, finite ones only."""
    out = {f"{prefix}{m}": v for m, v in means[key].items()}
    for m, (lo, hi) in intervals.get(key, {}).items():
        out[f"{prefix}{m}.ci_low"], out[f"{prefix}{m}.ci_high"] = lo, hi
    return {k: v for k, v in out.items() if math.isfinite(v)}


def _model_tags(spec: ModelSpec) -> dict[str, str]:
    from pipeline.storage import redact

    tags = {"deepfill.model_ref": redact(spec.ref)}
    for fact, tag in (("model_name", "model_name"), ("model_version", "model_version"), ("run_id", "model_run_id"),
                      ("arm", "arm")):
        if spec.facts.get(fact):
            tags[f"deepfill.{tag}"] = str(spec.facts[fact])
    return tags


def _log_to_mlflow(opts: EvaluateOptions, specs: list[ModelSpec], means: dict, intervals: dict, truth: dict,
                   count: int, num_skipped: int, files: dict[str, bytes]) -> str:
    """The evaluation's MLflow run: params, every method's means and intervals, the report files (without
    ``images/``), tags linking it to what it judged; with several models, one child run per model. Each
    judged model version is tagged ``deepfill.eval.<preset>`` with its run (or child run) id."""
    import mlflow

    from pipeline.storage import redact

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(opts.experiment)  # not set_experiment: no process-wide default left
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(opts.experiment)
    single = len(specs) == 1
    tags = {"deepfill.job": "evaluate", "deepfill.models": str(len(specs))}
    if single:
        tags.update(_model_tags(specs[0]))
    if opts.sweep:
        tags["deepfill.sweep_run_id"] = opts.sweep
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"evaluate-{opts.mask_preset}", tags=tags) as run:
        mlflow.log_params({"mask_preset": opts.mask_preset, "seed": opts.seed, "size": opts.size,
                           "num_images": count, "num_skipped": num_skipped, "images": redact(opts.images),
                           "inpaint_radius": INPAINT_RADIUS, "bootstrap": opts.bootstrap,
                           "bootstrap_seed": opts.bootstrap_seed, "models": len(specs)})
        values = {}
        for key in [s.key for s in specs] + list(BASELINES):
            values.update(_metric_values(key, means, intervals, f"{key}/"))
        values.update({f"truth/{k}": v for k, v in truth.items() if math.isfinite(v)})
        mlflow.log_metrics(values)
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                path = os.path.join(tmp, name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)
            mlflow.log_artifacts(tmp, artifact_path="report")
        for spec in specs:
            judged = run.info.run_id
            if not single:
                with mlflow.start_run(experiment_id=experiment_id, run_name=spec.label[:250], nested=True,
                                      tags={"deepfill.job": "evaluate-model", "deepfill.label": spec.label,
                                            **_model_tags(spec)}) as child:
                    mlflow.log_metrics(_metric_values(spec.key, means, intervals, ""))
                    judged = child.info.run_id
            if "model_version" in spec.facts:
                client.set_model_version_tag(spec.facts["model_name"], spec.facts["model_version"],
                                             f"deepfill.eval.{opts.mask_preset}", judged)
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
