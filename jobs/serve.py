"""``deepfill serve``: a model behind HTTP on Ray Serve, with batched requests and a page to paint holes.

    deepfill serve --model models:/deepfill@production [--num-replicas N | --autoscale MIN,MAX] [--use-gpu] \\
        [--host 127.0.0.1 --port 8000] [--max-batch-size 8 --batch-wait-timeout-s 0.02 | --no-batching] \\
        [--max-bytes 32MB] [--max-pixels 4194304] [--poll-s 60]

Joins the cluster named by ``RAY_ADDRESS`` or starts a local Ray (``pipeline.cluster.connect``), starts Serve's
HTTP proxy on ``--host``/``--port`` (loopback unless told otherwise), deploys the application and runs until
Ctrl-C or SIGTERM (then deletes it; a local Ray started here is shut down). On a cluster, deploy a config instead:
``serve deploy serve.yaml`` (or ``serve run jobs.serve:app_builder model=models:/deepfill@production``) with
``import_path: jobs.serve:app_builder`` and ``args:`` holding any of the options below by name (``model``,
``max_batch_size``, ``poll_s``, ...); the proxy's host and port then come from the config's ``http_options``,
and ``deployments:`` entries named ``InpaintServer`` override replicas and resources
(``infra/kuberay/rayservice.yaml`` is such a config for KubeRay).

API (``--route-prefix`` is prepended; errors are JSON ``{"reason": <code>, "detail": <text>}``):

- ``POST /inpaint``: multipart/form-data with the files ``image`` and ``mask``, or JSON
  ``{"image": <base64>, "mask": <base64>}`` (a ``data:...;base64,`` URL is accepted too) -> 200 ``image/png``
  of the image's size, the known pixels identical, the holes filled. The image is decoded by
  ``pipeline.images.decode_image`` (EXIF orientation, any mode -> RGB), the mask by ``decode_mask``:
  white/nonzero = hole, RGBA masks count luminance x alpha, so white strokes on a transparent canvas are
  holes. ``?attention=1`` -> 200 ``application/json`` ``{"image": <base64 PNG>, "attention": <base64 PNG:
  models.visualize.flow_to_image of the attention offsets, upsampled to the image size>, "width": W,
  "height": H, "seconds": s}``. Every 200 has the headers ``X-Model-Version`` and ``X-Model-Sha256``.
- ``GET /healthz`` -> 200 ``ok`` once the model is loaded; ``GET /model`` -> JSON: name, version, alias, ref,
  run_id, sha256 (of the generator file), step, cnum, provenance (the checkpoint's ``extra``, e.g. what an
  import converted), loaded_at, device, the limits and this replica's counters (requests, batches,
  forward_passes, largest_batch); ``POST /reload`` -> resolve the model again now (below), JSON
  ``{"changed": bool, "model": {...}}``; ``GET /`` -> ``jobs/static/index.html`` as text/html (404 with
  reason ``no_page`` when the file is missing); read at every request, no build step.
- Bad input is a 4xx, never a 500, with the reason codes of ``deepfill infer``: 400 ``missing_field``,
  ``bad_json``, ``bad_base64``, ``bad_multipart``; 413 ``too_large`` (the request body, or one file, over
  ``--max-bytes``; checked from Content-Length before reading, and while reading), ``decompression_bomb`` /
  ``mask_decompression_bomb`` (over ``--max-pixels``); 415 ``unsupported_content_type``; 422 ``empty``,
  ``not_an_image``, ``truncated``, ``corrupt``, ``unsupported_mode``, the ``mask_*`` codes,
  ``mask_size_mismatch``, ``no_hole`` (a mask without hole pixels); 404 ``not_found``, 405
  ``method_not_allowed``. A failure of the model itself is 500 ``inference_failed``.

Batching: ``/inpaint`` decodes and validates in the request, then awaits ``_batched``, a ``@serve.batch``
method (``--max-batch-size`` requests, waiting at most ``--batch-wait-timeout-s`` after the first; one batch
at a time per replica, run off the event loop so requests keep arriving and queue for the next batch).
Inside a batch, requests of the same size (and the same ``attention`` flag) share a forward pass through
``models.inpaint_uint8`` (the one inference path), cut so that one pass holds at most ``--max-batch-pixels``
pixels (as ``deepfill infer`` does). ``--no-batching`` is ``--max-batch-size 1``: one request per forward
pass, the same code path. Each replica accepts ``max(16, 2 x max_batch_size)`` requests at once.

Following the alias: with ``--model models:/name@alias``, each replica resolves the alias through the MLflow
registry every ``--poll-s`` seconds (0 = never) in a background thread; when it names another version, that
version's generator file is fetched and loaded beside the serving one and swapped in atomically (requests in
flight finish on the old one; a failed load is logged and the old one keeps serving). ``POST /reload`` does
the same check at once, on the replica that answers it (with several replicas the others follow at their
next poll). For any other ``--model`` (a file, ``models:/name/3``, ``runs:/``) nothing is polled;
``POST /reload`` fetches it again and swaps it in when its sha256 changed. Registry access never runs model
code: ``jobs.serving.fetch_checkpoint`` reads the ``checkpoint`` artifact only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import email.message
import hashlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ray import serve

from jobs.infer import MAX_BATCH_PIXELS

log = logging.getLogger(__name__)

PAGE_PATH = Path(__file__).with_name("static") / "index.html"  # the page served at GET /
DEPLOYMENT_NAME = "InpaintServer"  # the deployment's name in the app (serve config ``deployments:`` entries)
DEFAULT_MAX_PIXELS = 2048 * 2048  # serving default for --max-pixels: a 2048^2 image takes minutes on 2 CPU cores

# HTTP status of each refusal (any other reason from pipeline.images: 422)
STATUS = {
    "missing_field": 400, "bad_json": 400, "bad_base64": 400, "bad_multipart": 400,
    "too_large": 413, "mask_too_large": 413, "decompression_bomb": 413, "mask_decompression_bomb": 413,
    "unsupported_content_type": 415, "not_found": 404, "no_page": 404, "method_not_allowed": 405,
    "inference_failed": 500,
}


@dataclass
class ServeOptions:
    """Options of ``deepfill serve`` (also the ``args`` of ``jobs.serve:app_builder`` in a Serve config)."""

    model: str  # models:/name@alias (followed, see --poll-s), models:/name/N, runs:/id/model or a generator file
    host: str = "127.0.0.1"  # address Serve's HTTP proxy binds (0.0.0.0 to accept other machines)
    port: int = 8000  # port of Serve's HTTP proxy
    route_prefix: str = "/"  # URL prefix of the API and page
    app_name: str = "deepfill"  # Serve application name
    num_replicas: int | None = None  # fixed number of replicas (default 1); not with --autoscale
    autoscale: list[int] | None = None  # MIN,MAX replicas, scaled by Serve on the ongoing requests
    use_gpu: bool = False  # one GPU per replica
    num_cpus_per_replica: float = 1.0  # CPUs reserved per replica (its torch threads: at least 1)
    batching: bool = True  # group concurrent requests (--no-batching: one request per forward pass)
    max_batch_size: int = 8  # requests grouped into one batch (1 = no batching)
    batch_wait_timeout_s: float = 0.02  # how long a batch waits for more requests after its first
    max_batch_pixels: int = MAX_BATCH_PIXELS  # most pixels in one forward pass (same-size images share one)
    max_bytes: str = "32MB"  # largest request body (and file) accepted: 413 too_large; bytes or e.g. 32MB
    max_pixels: int = DEFAULT_MAX_PIXELS  # largest image (pixels): 413 decompression_bomb
    poll_s: float = 60.0  # resolve a models:/name@alias ref again every this many seconds (0 = never)
    tracking_uri: str | None = None  # MLflow tracking URI for the replicas (default: MLFLOW_TRACKING_URI / MLflow's)

    def __post_init__(self):
        from jobs.options import check_name

        if not self.model:
            raise ValueError("model (--model) must not be empty")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1-65535, got {self.port}")
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"route_prefix must start with '/', got {self.route_prefix!r}")
        check_name(self.app_name, "app_name")
        if self.num_replicas is not None and self.num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {self.num_replicas}")
        if self.autoscale is not None:
            if self.num_replicas is not None:
                raise ValueError("give num_replicas (--num-replicas) or autoscale (--autoscale), not both")
            if len(self.autoscale) != 2 or not 0 <= self.autoscale[0] <= self.autoscale[1] or self.autoscale[1] < 1:
                raise ValueError(f"autoscale must be MIN,MAX with 0 <= MIN <= MAX and MAX >= 1, got {self.autoscale}")
        if not self.num_cpus_per_replica >= 0:
            raise ValueError(f"num_cpus_per_replica must be >= 0, got {self.num_cpus_per_replica}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if not self.batch_wait_timeout_s >= 0:
            raise ValueError(f"batch_wait_timeout_s must be >= 0, got {self.batch_wait_timeout_s}")
        if self.max_batch_pixels < 1:
            raise ValueError(f"max_batch_pixels must be >= 1, got {self.max_batch_pixels}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")
        if not self.poll_s >= 0:
            raise ValueError(f"poll_s must be >= 0, got {self.poll_s}")
        try:
            self.max_bytes_limit  # noqa: B018 - validates max_bytes
        except ValueError as err:
            raise ValueError(f"max_bytes: {err}") from None

    @property
    def max_bytes_limit(self) -> int:
        """``max_bytes`` in bytes."""
        from pipeline.config import parse_size

        return parse_size(self.max_bytes)

    @property
    def batch_size(self) -> int:
        """Requests per batch as served: 1 with ``batching`` off."""
        return self.max_batch_size if self.batching else 1


Options = ServeOptions  # what `deepfill serve` reads (jobs.cli)


class Refused(Exception):
    """A request refused with a reason code (``STATUS`` gives its HTTP status; 422 when not listed)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail

    @property
    def status(self) -> int:
        return STATUS.get(self.reason, 422)


# ---------------------------------------------------------------------------------------------------------
# Request parsing: pure functions of bytes.


def _header_params(value: str, header: str = "content-type") -> email.message.Message:
    msg = email.message.Message()
    msg[header] = value
    return msg


def parse_multipart(body: bytes, content_type: str) -> dict[str, bytes]:
    """multipart/form-data ``body`` -> {field name: bytes} (the first part of each name wins).
    Raises Refused("bad_multipart") for a body that is not well-formed multipart."""
    boundary = _header_params(content_type).get_param("boundary")
    if not boundary or not isinstance(boundary, str):
        raise Refused("bad_multipart", "multipart/form-data without a boundary")
    parts = body.split(b"--" + boundary.encode("latin-1"))
    if len(parts) < 3 or not parts[-1].startswith(b"--"):
        raise Refused("bad_multipart", "the body does not end with the closing boundary")
    fields: dict[str, bytes] = {}
    for part in parts[1:-1]:
        if not part.startswith(b"\r\n") or not part.endswith(b"\r\n"):
            raise Refused("bad_multipart", "a part is not delimited by CRLF")
        head, sep, content = part[2:-2].partition(b"\r\n\r\n")
        if not sep:
            raise Refused("bad_multipart", "a part has no blank line after its headers")
        disposition = ""
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-disposition":
                disposition = value.strip()
        field_name = _header_params(disposition, "content-disposition").get_param(
            "name", header="content-disposition") if disposition else None
        if not isinstance(field_name, str):
            raise Refused("bad_multipart", "a part has no Content-Disposition name")
        fields.setdefault(field_name, content)
    return fields


_DATA_URL = re.compile(r"^data:[^,]*;base64,", re.IGNORECASE)


def _b64(value, field: str) -> bytes:
    if not isinstance(value, str):
        raise Refused("bad_json", f"{field!r} must be a base64 string, got {type(value).__name__}")
    text = re.sub(r"\s+", "", _DATA_URL.sub("", value, count=1))
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise Refused("bad_base64", f"{field!r} is not base64: {err}") from None


def parse_fields(body: bytes, content_type: str) -> tuple[bytes, bytes]:
    """A request body -> (image bytes, mask bytes); raises Refused with the reason."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind == "multipart/form-data":
        fields = parse_multipart(body, content_type)
    elif kind == "application/json" or kind.endswith("+json"):
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as err:
            raise Refused("bad_json", f"the body is not JSON: {err}"[:200]) from None
        if not isinstance(data, dict):
            raise Refused("bad_json", f"the body must be a JSON object, got {type(data).__name__}")
        fields = {k: _b64(data[k], k) for k in ("image", "mask") if k in data}
    else:
        raise Refused("unsupported_content_type",
                      f"send multipart/form-data or application/json, got {content_type or 'no Content-Type'!r}")
    missing = [k for k in ("image", "mask") if k not in fields]
    if missing:
        raise Refused("missing_field", f"the request has no {' and no '.join(repr(m) for m in missing)} field")
    return fields["image"], fields["mask"]


def decode_request(image_bytes: bytes, mask_bytes: bytes, *, max_pixels: int, max_bytes: int):
    """-> (image uint8 (H, W, 3) RGB, mask uint8 (H, W) {0, 1}, 1 = hole); raises Refused with the reason of
    ``pipeline.images`` (``mask_*`` for the mask) or ``no_hole``."""
    from pipeline.images import ImageRejected, decode_image, decode_mask

    try:
        image = decode_image(image_bytes, max_pixels=max_pixels, max_bytes=max_bytes)
        mask = decode_mask(mask_bytes, image.shape[0], image.shape[1], max_pixels=max_pixels, max_bytes=max_bytes)
    except ImageRejected as err:
        raise Refused(err.reason, err.detail) from None
    except Exception as err:  # noqa: BLE001 - pipeline.images should only raise ImageRejected
        raise Refused("corrupt", f"{type(err).__name__}: {err}"[:200]) from None
    if not mask.any():
        raise Refused("no_hole", "the mask has no hole pixels (white = hole)")
    return image, mask


# ---------------------------------------------------------------------------------------------------------
# The forward passes of one batch: a pure function of the generator and the decoded requests.


@dataclass
class Job:
    """One decoded request: image uint8 (H, W, 3) RGB, mask uint8 (H, W), 1 = hole."""

    image: np.ndarray
    mask: np.ndarray
    attention: bool = False


def attention_picture(offsets, height: int, width: int) -> np.ndarray:
    """Attention offsets (N, 2, ceil(H/8), ceil(W/8)) -> uint8 (N, height, width, 3): flow_to_image colours, each
    offset cell repeated over the 8x8 pixels it stands for, cropped to the image."""
    from models.visualize import flow_to_image, upsample_nearest

    pictures = flow_to_image(offsets)  # (N, h8, w8, 3)
    h8, w8 = pictures.shape[1:3]
    return upsample_nearest(pictures, h8 * 8, w8 * 8)[:, :height, :width]  # (N, H, W, 3)


def inpaint_jobs(generator, jobs: list[Job], max_batch_pixels: int = MAX_BATCH_PIXELS) -> tuple[list, int]:
    """Run ``jobs`` through ``models.inpaint_uint8``: jobs of one size and attention flag share a forward pass
    of at most ``max_batch_pixels`` pixels (at least one image). Returns (per job, in order: (result uint8 (H, W, 3), attention uint8 (H, W, 3)
    or None), or the exception its forward pass raised; the number of forward passes)."""
    import models

    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault((*job.image.shape[:2], job.attention), []).append(i)
    out: list = [None] * len(jobs)
    passes = 0
    for (h, w, attention), idx in groups.items():
        step = max(1, max_batch_pixels // (h * w))
        for j in range(0, len(idx), step):
            chunk = idx[j:j + step]
            passes += 1
            try:
                images = np.stack([jobs[i].image for i in chunk])  # (n, H, W, 3)
                masks = np.stack([jobs[i].mask for i in chunk])[..., None]  # (n, H, W, 1)
                if attention:
                    results, offsets = models.inpaint_uint8(generator, images, masks, return_offsets=True)
                    pictures = attention_picture(offsets, h, w)
                else:
                    results, pictures = models.inpaint_uint8(generator, images, masks), [None] * len(chunk)
            except Exception as err:  # noqa: BLE001 - reported per request as inference_failed
                log.exception("inference failed for %d image(s) of %dx%d", len(chunk), w, h)
                for i in chunk:
                    out[i] = err
                continue
            for k, i in enumerate(chunk):
                out[i] = (results[k], pictures[k])
    return out, passes


# ---------------------------------------------------------------------------------------------------------
# The model a replica serves, and how it follows its reference.


def _is_alias(ref: str) -> bool:
    return ref.startswith("models:/") and "@" in ref


def load_served(ref: str, *, device: str, version_uri: str | None = None, registry: dict | None = None):
    """Fetch and load the generator behind ``ref`` (``version_uri`` instead when the alias was resolved
    already): -> (generator, facts dict for ``GET /model``). Never runs model code (``fetch_checkpoint``)."""
    import models.checkpoint
    from jobs.serving import fetch_checkpoint
    from pipeline.storage import redact

    data, info = fetch_checkpoint(version_uri or ref)
    generator, meta = models.checkpoint.load_for_inference(data, device=device)
    info = {**info, **(registry or {})}
    facts = {
        "ref": redact(ref), "name": info.get("model_name"), "version": info.get("model_version"),
        "alias": info.get("alias"), "run_id": info.get("run_id"), "sha256": hashlib.sha256(data).hexdigest(),
        "step": int(meta.get("step", 0)), "cnum": int(meta["model"]["cnum"]),
        "provenance": meta.get("extra") or None, "device": device,
        "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return generator, facts


class ModelHolder:
    """The generator a replica serves and its facts, swapped as one tuple (readers take ``current`` once)."""

    def __init__(self, ref: str, device: str):
        self.ref, self.device = ref, device
        self.lock = threading.Lock()  # one check / load at a time
        self.current = load_served(ref, device=device, **self._resolve())

    def _resolve(self) -> dict:
        if not _is_alias(self.ref):
            return {}
        from jobs.serving import resolve_model_version

        registry = resolve_model_version(self.ref)
        return {"version_uri": registry["model_uri"], "registry": registry}

    def check(self) -> bool:
        """Resolve the reference again; load and swap in the model when it changed. True when swapped."""
        with self.lock:
            _, facts = self.current
            if _is_alias(self.ref):
                resolved = self._resolve()
                if resolved["registry"]["model_version"] == facts["version"]:
                    return False
                generator, new = load_served(self.ref, device=self.device, **resolved)
            else:
                generator, new = load_served(self.ref, device=self.device)
                if new["sha256"] == facts["sha256"]:
                    return False
            self.current = (generator, new)
            log.info("now serving %s (version %s, sha256 %s), was version %s", new["ref"], new["version"],
                     new["sha256"][:12], facts["version"])
            return True


# ---------------------------------------------------------------------------------------------------------
# The deployment.


def _response(status: int, body, media_type: str, headers: dict | None = None):
    from starlette.responses import Response

    return Response(body, status_code=status, media_type=media_type, headers=headers)


def _json(status: int, data: dict, headers: dict | None = None):
    return _response(status, json.dumps(data, allow_nan=False), "application/json", headers)


def _refusal(err: Refused):
    return _json(err.status, {"reason": err.reason, "detail": err.detail})


async def _read_body(request, limit: int) -> bytes:
    """The request body, refused (413 too_large) from Content-Length or as soon as it passes ``limit``."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise Refused("too_large", f"the request body is {length} bytes, over --max-bytes {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refused("too_large", f"the request body is over --max-bytes {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


@serve.deployment(name=DEPLOYMENT_NAME)
class InpaintServer:
    """One replica: the model (``ModelHolder``), the batch queue and the HTTP routes (module docstring)."""

    def __init__(self, settings: dict):
        from jobs.options import from_dict

        self.opts = from_dict(ServeOptions, settings)
        import torch

        torch.set_num_threads(max(1, int(self.opts.num_cpus_per_replica)))
        if self.opts.tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(self.opts.tracking_uri)
        self.device = "cuda" if self.opts.use_gpu else "cpu"
        self.model = ModelHolder(self.opts.model, self.device)
        self._batched.set_max_batch_size(self.opts.batch_size)
        self._batched.set_batch_wait_timeout_s(self.opts.batch_wait_timeout_s)
        self.stats = {"requests": 0, "refused": 0, "batches": 0, "forward_passes": 0, "largest_batch": 0}
        self._stop = threading.Event()
        if _is_alias(self.opts.model) and self.opts.poll_s > 0:
            threading.Thread(target=self._poll, name="deepfill-serve-poll", daemon=True).start()

    def _poll(self) -> None:
        while not self._stop.wait(self.opts.poll_s):
            try:
                self.model.check()
            except Exception as err:  # noqa: BLE001 - keep serving the loaded model
                from pipeline.storage import redact

                log.warning("could not follow %s: %s", redact(self.opts.model), redact(f"{type(err).__name__}: {err}"))

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()

    def check_health(self) -> None:
        if self.model.current is None:
            raise RuntimeError("no model loaded")

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _batched(self, jobs: list[Job]) -> list:
        generator, facts = self.model.current  # one model for the whole batch, even if a swap happens now
        t0 = time.perf_counter()
        results, passes = await asyncio.to_thread(inpaint_jobs, generator, jobs, self.opts.max_batch_pixels)
        seconds = time.perf_counter() - t0
        self.stats["batches"] += 1
        self.stats["forward_passes"] += passes
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        return [(r, facts, seconds) for r in results]

    def _model_json(self) -> dict:
        _, facts = self.model.current
        limits = {k: getattr(self.opts, k) for k in ("max_bytes", "max_pixels", "max_batch_pixels", "poll_s",
                                                     "batch_wait_timeout_s")}
        return {**facts, **limits, "max_batch_size": self.opts.batch_size, "stats": dict(self.stats)}

    async def __call__(self, request):
        path = request.scope.get("path", "/")
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        path = "/" + path.strip("/")
        routes = {"/inpaint": ("POST", self._inpaint), "/healthz": ("GET", self._healthz),
                  "/model": ("GET", self._model), "/reload": ("POST", self._reload), "/": ("GET", self._page)}
        if path not in routes:
            return _refusal(Refused("not_found", f"no route {path}; see GET /model, POST /inpaint"))
        method, handler = routes[path]
        if request.method != method and not (method == "GET" and request.method == "HEAD"):
            return _refusal(Refused("method_not_allowed", f"{path} takes {method}, got {request.method}"))
        return await handler(request)

    async def _healthz(self, request):
        return _response(200, "ok", "text/plain")

    async def _model(self, request):
        return _json(200, self._model_json())

    async def _reload(self, request):
        try:
            changed = await asyncio.to_thread(self.model.check)
        except Exception as err:  # noqa: BLE001 - the old model keeps serving
            from pipeline.storage import redact

            return _json(502, {"reason": "reload_failed", "detail": redact(f"{type(err).__name__}: {err}")[:300]})
        return _json(200, {"changed": changed, "model": self._model_json()})

    async def _page(self, request):
        try:
            page = PAGE_PATH.read_bytes()
        except OSError:
            return _refusal(Refused("no_page", f"the page {PAGE_PATH.name} is not installed next to jobs/serve.py "
                                               "(jobs/static/index.html); the API works without it"))
        return _response(200, page, "text/html; charset=utf-8")

    async def _inpaint(self, request):
        self.stats["requests"] += 1
        t0 = time.perf_counter()
        try:
            body = await _read_body(request, self.opts.max_bytes_limit)
            image_bytes, mask_bytes = parse_fields(body, request.headers.get("content-type", ""))
            del body
            image, mask = decode_request(image_bytes, mask_bytes, max_pixels=self.opts.max_pixels,
                                         max_bytes=self.opts.max_bytes_limit)
        except Refused as err:
            self.stats["refused"] += 1
            return _refusal(err)
        attention = _flag(request.query_params.get("attention"))
        result, facts, _ = await self._batched(Job(image, mask, attention))
        if isinstance(result, Exception):
            return _refusal(Refused("inference_failed", f"{type(result).__name__}: {result}"[:300]))
        from pipeline.images import encode_png

        filled, picture = result
        headers = {"X-Model-Version": str(facts["version"]), "X-Model-Sha256": facts["sha256"]}
        if not attention:
            return _response(200, encode_png(filled), "image/png", headers)
        return _json(200, {"image": base64.b64encode(encode_png(filled)).decode("ascii"),
                           "attention": base64.b64encode(encode_png(picture)).decode("ascii"),
                           "width": int(image.shape[1]), "height": int(image.shape[0]),
                           "seconds": round(time.perf_counter() - t0, 4)}, headers)


# ---------------------------------------------------------------------------------------------------------
# Building and running the application.


def build_app(opts: ServeOptions):
    """The Serve application for ``opts`` (replicas, resources and batching set from the options)."""
    settings = dataclasses.asdict(opts)
    deployment_options: dict = {
        "ray_actor_options": {"num_cpus": opts.num_cpus_per_replica, "num_gpus": 1 if opts.use_gpu else 0},
        "max_ongoing_requests": max(16, 2 * opts.batch_size),
    }
    if opts.autoscale is not None:
        deployment_options["autoscaling_config"] = {
            "min_replicas": opts.autoscale[0], "max_replicas": opts.autoscale[1],
            "target_ongoing_requests": max(2, opts.batch_size)}
    else:
        deployment_options["num_replicas"] = opts.num_replicas or 1
    return InpaintServer.options(**deployment_options).bind(settings)


def app_builder(args: dict):
    """Serve's application builder (``import_path: jobs.serve:app_builder``): ``args`` holds options of
    ``ServeOptions`` by name, e.g. ``{"model": "models:/deepfill@production", "max_batch_size": 8}``."""
    from jobs.options import ConfigError, from_dict

    try:
        opts = from_dict(ServeOptions, dict(args or {}))
    except ConfigError as err:
        raise ValueError(f"jobs.serve:app_builder: {err}") from None
    return build_app(opts)


def _absolute(opts: ServeOptions) -> ServeOptions:
    """Local paths made absolute for replicas that run in other working directories: a relative ``model``
    file, and MLflow's default ``sqlite:///mlflow.db`` (relative to this directory) as ``tracking_uri``."""
    model, tracking = opts.model, opts.tracking_uri
    if "://" not in model and ":/" not in model:
        model = os.path.abspath(model)
    if tracking is None and model.startswith(("models:/", "runs:/")):
        import mlflow

        uri = mlflow.get_tracking_uri()
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            tracking = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    return dataclasses.replace(opts, model=model, tracking_uri=tracking)


def run(opts: ServeOptions) -> int:
    """``deepfill serve``: deploy the app and block until Ctrl-C."""
    import ray

    from jobs.options import ConfigError
    from pipeline.cluster import connect

    opts = _absolute(opts)
    if opts.model.startswith("models:/"):  # fail fast, with MLflow's one-line reason, before Serve starts
        from jobs.serving import resolve_model_version

        if opts.tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(opts.tracking_uri)
        resolve_model_version(opts.model)
    elif "://" not in opts.model and not os.path.exists(opts.model):
        raise ConfigError(f"model (--model): no such file or folder: {opts.model}")
    local = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    connect()
    serve.start(http_options={"host": opts.host, "port": opts.port})
    serve.run(build_app(opts), name=opts.app_name, route_prefix=opts.route_prefix, blocking=False)
    url = f"http://{opts.host}:{opts.port}{opts.route_prefix.rstrip('/')}"
    log.info("serving %s at %s/ (POST %s/inpaint; Ctrl-C stops)", opts.model, url, url)
    print(json.dumps({"url": url + "/", "model": opts.model, "app": opts.app_name}), flush=True)
    def _stop(signum, frame):  # `kill` / Kubernetes stop like Ctrl-C: delete the app, shut down what we started
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        if local:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(opts.app_name)
    return 0


if __name__ == "__main__":
    from jobs.cli import main

    sys.exit(main(["serve", *sys.argv[1:]]))
