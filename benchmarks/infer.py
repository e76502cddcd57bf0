"""Benchmark of ``deepfill infer``: Ray Data actor pool vs a naive sequential loop, plus peak memory at 2048x2048.

    python benchmarks/infer.py [--images 200] [--size 512] [--cnum 32] [--repeats 1] [--cpus 2]

Both arms run in this process on the same inputs (JPEG photos on local disk, ``box`` masks drawn from
``--mask-preset box --seed 0``) with the same generator (random weights, ``--cnum``) and write PNGs:

- ``deepfill_infer``: the real job function ``jobs.infer.run_infer`` on a local Ray cluster of ``--cpus`` CPUs
  (``--cpus`` actors of one CPU / one torch thread each, batch ``--batch-size``); the timing covers the whole
  job (listing, model broadcast, actor start, inference, writes, manifest), not ``ray.init``.
- ``naive_loop``: read, decode, inpaint (batch of 1, torch with ``--cpus`` threads), encode, write, one image
  at a time, through the same helper functions.

``layout``: one ``--size`` image with a ``box`` mask through ``models.inpaint_uint8`` on ``--cpus``
threads: the plain model (default layout, attention from every row), channels_last (``models.for_inference``)
and the infer path (channels_last, attention only from rows that reach a hole); alternating,
``--layout-repeats`` each; medians and their ratios.

``peak_memory_2048``: in a fresh subprocess, one 2048x2048 image through the infer path (decode, inpaint,
encode), peak RSS and its increase over the process with the model loaded.

Prints one JSON object; times are medians over ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

# run as a script, this folder comes first on sys.path, and its sibling benchmark files (e.g. pipeline.py)
# would shadow the project's packages of the same name
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402


def make_images(folder: str, count: int, size: int) -> list[str]:
    """``count`` distinct JPEG photos of size x size (crops of scikit-image's astronaut and coffee)."""
    import cv2
    import skimage.data

    sources = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    rng = np.random.default_rng(0)
    keys = []
    for i in range(count):
        src = sources[i % len(sources)]
        scale = size / min(src.shape[:2]) * rng.uniform(1.0, 1.5)
        big = cv2.resize(src, (round(src.shape[1] * scale) + 1, round(src.shape[0] * scale) + 1))
        y, x = rng.integers(0, big.shape[0] - size + 1), rng.integers(0, big.shape[1] - size + 1)
        crop = np.ascontiguousarray(big[y : y + size, x : x + size, ::-1])
        key = f"img/{i:04d}.jpg"
        os.makedirs(os.path.join(folder, "img"), exist_ok=True)
        cv2.imwrite(os.path.join(folder, key), crop, [cv2.IMWRITE_JPEG_QUALITY, 92])
        keys.append(key)
    return keys


def naive_loop(images: str, output: str, keys: list[str], model_path: str, threads: int) -> float:
    """The sequential baseline: one image at a time, read -> decode -> inpaint -> encode -> write."""
    import torch

    import models
    from jobs import infer, serving
    from pipeline import storage
    from pipeline.images import encode_png

    torch.set_num_threads(threads)
    generator, _ = serving.load_generator(model_path, device="cpu")
    t0 = time.perf_counter()
    for key in keys:
        data = storage.read_bytes(storage.join(images, key))
        image, mask = infer.decode_pair(key, data, None, mask_preset="box", seed=0, max_pixels=64_000_000)
        out = models.inpaint_uint8(generator, image[None], mask[None, ..., None])[0]
        storage.write_bytes_atomic(storage.join(output, infer.output_key(key)), encode_png(out))
    return time.perf_counter() - t0


def ray_job(images: str, output: str, model_path: str, cpus: int, batch_size: int) -> float:
    from jobs import infer

    opts = infer.InferOptions(images=images, output=output, model=model_path, mask_preset="box", seed=0,
                              batch_size=batch_size, num_actors=cpus, max_errors=0)
    t0 = time.perf_counter()
    result = infer.run_infer(opts)
    elapsed = time.perf_counter() - t0
    if result.exit_code != 0 or result.counts.get("ok") != result.processed:
        raise RuntimeError(f"infer run failed: {result.message}")
    return elapsed


_PEAK_SCRIPT = r"""
import json, resource, sys, time
import numpy as np, torch
import models
from jobs import infer, serving
from pipeline.images import encode_png
torch.set_num_threads(int(sys.argv[3]))
generator, _ = serving.load_generator(sys.argv[1], device="cpu")
size = int(sys.argv[2])
rng = np.random.default_rng(0)
image = np.clip(rng.normal(128, 40, (size, size, 3)), 0, 255).astype(np.uint8)
data = encode_png(image)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
image, mask = infer.decode_pair("big.png", data, None, mask_preset="box", seed=0, max_pixels=64_000_000)
out = models.inpaint_uint8(generator, image[None], mask[None, ..., None])[0]
png = encode_png(out)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"size": size, "seconds": seconds, "peak_rss_mib": peak / 1024,
                  "model_loaded_rss_mib": base / 1024, "increase_mib": (peak - base) / 1024,
                  "score_budget_bytes": int(generator.attention.max_score_bytes)
                  if generator.attention is not None else None}))
"""


def layout_latency(model_path: str, size: int, threads: int, repeats: int) -> dict:
    """Seconds per image of three ways to run the same weights on the same input, alternating:
    ``default`` (contiguous weights, attention from every row: the plain model), ``channels_last`` (NHWC
    weights, every row) and ``infer_path`` (NHWC and attention only from rows that can reach a hole: what
    ``deepfill infer`` runs). Every row is attended when offsets are asked for, so ``return_offsets``
    selects it."""
    import torch

    import models.checkpoint
    from jobs import serving
    from pipeline.masks import box_mask

    torch.set_num_threads(threads)
    plain, _ = models.checkpoint.load_generator(model_path)
    plain.eval()
    fast, _ = serving.load_generator(model_path, device="cpu")
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(128, 40, (1, size, size, 3)), 0, 255).astype(np.uint8)
    mask = box_mask(size, size, np.random.default_rng(0))[None, ..., None]  # the benchmark's mask preset
    variants = {"default": (plain, True), "channels_last": (fast, True), "infer_path": (fast, False)}
    times = {name: [] for name in variants}
    outs = {}
    for _ in range(repeats):
        for name, (generator, every_row) in variants.items():
            t0 = time.perf_counter()
            out = models.inpaint_uint8(generator, image, mask, return_offsets=every_row)
            times[name].append(time.perf_counter() - t0)
            outs[name] = out[0] if every_row else out
    diff = max(int(np.abs(outs["default"].astype(int) - o.astype(int)).max()) for o in outs.values())
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"threads": threads, "hole_fraction": float(mask.mean()), "seconds_per_image": med, "runs": times,
            "speedup_over_default": {k: med["default"] / v for k, v in med.items()},
            "max_abs_uint8_difference": diff}


def peak_memory(model_path: str, size: int, threads: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, model_path, str(size), str(threads)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--cnum", type=int, default=32)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--peak-size", type=int, default=2048)
    parser.add_argument("--skip-peak", action="store_true")
    parser.add_argument("--layout-repeats", type=int, default=3, help="0 skips the layout comparison")
    args = parser.parse_args()

    import ray
    import torch

    import models
    import models.checkpoint

    work = tempfile.mkdtemp(prefix="bench-infer-")
    try:
        torch.manual_seed(0)
        model_path = os.path.join(work, "generator.pt")
        models.checkpoint.save_generator(model_path, models.InpaintGenerator(cnum=args.cnum).eval())
        images = os.path.join(work, "in")
        keys = make_images(images, args.images, args.size)

        layout = layout_latency(model_path, args.size, args.cpus, args.layout_repeats) if args.layout_repeats else None
        naive_s, ray_s = [], []
        for r in range(args.repeats):
            naive_s.append(naive_loop(images, os.path.join(work, f"naive{r}"), keys, model_path, args.cpus))
        for attempt in range(3):  # a busy machine can make the raylet miss Ray's 30 s start deadline
            try:
                ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
                break
            except Exception:  # noqa: BLE001
                if attempt == 2:
                    raise
                time.sleep(10)
        ray.data.DataContext.get_current().enable_progress_bars = False
        for r in range(args.repeats):
            ray_s.append(ray_job(images, os.path.join(work, f"ray{r}"), model_path, args.cpus, args.batch_size))
        ray.shutdown()
        naive_med, ray_med = statistics.median(naive_s), statistics.median(ray_s)
        out = {
            "benchmark": "deepfill infer",
            "images": args.images,
            "size": args.size,
            "cnum": args.cnum,
            "cpus": args.cpus,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "naive_loop": {"seconds": naive_med, "images_per_s": args.images / naive_med, "runs": naive_s},
            "deepfill_infer": {"seconds": ray_med, "images_per_s": args.images / ray_med, "runs": ray_s},
            "speedup": naive_med / ray_med,
            "layout": layout,
            "load_average_1min": os.getloadavg()[0],
        }
        if not args.skip_peak:
            out["peak_memory"] = peak_memory(model_path, args.peak_size, args.cpus)
        out["driver_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(out, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
