"""``make demo`` (``python -m jobs.demo``): the whole system on this machine, in a few minutes.

1. builds a small dataset from the photos and textures scikit-image ships inside its wheel: random crops at
   random scales, and a held-out split cut from two source images the training set never sees;
2. ``deepfill prepare``  -> validated Parquet shards (local folder);
3. ``deepfill train --config configs/demo.yaml`` on local Ray with 2 DDP workers, tracked in MLflow (SQLite
   in the working directory) and registered as ``deepfill-demo@candidate``;
4. ``deepfill infer`` on the held-out images with the registered model;
5. ``deepfill evaluate`` on the held-out images: ours against OpenCV Telea and Navier-Stokes;
6. prints a summary: the metrics, where the pictures and the report are, and the ``mlflow ui`` command.

Every step runs the real ``deepfill`` command line (``jobs.cli.main``) with the arguments printed above it,
in this process, on one local Ray instance that the four commands share. Outputs go to ``demo_output/``
(recreated on every run); MLflow keeps every run, so a second ``make demo`` registers version 2 and moves
the alias to it. ``--set key.path=value`` is passed on to ``deepfill train`` (e.g. ``--set steps=2000``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# scikit-image's bundled images (no download): natural photos and textures. Grayscale ones become RGB.
TRAIN_SOURCES = (
    "astronaut", "chelsea", "rocket", "camera", "hubble_deep_field", "immunohistochemistry",
    "stereo_motorcycle", "brick", "grass", "coins",
)
HELD_OUT_SOURCES = ("coffee", "gravel")  # one photo, one texture; never cropped for training

CONFIG = "configs/demo.yaml"
MODEL_NAME = "deepfill-demo"  # tracking.registered_model in configs/demo.yaml
ALIAS = "candidate"  # tracking.alias in configs/demo.yaml
MASK_PRESET = "box"  # the v1 masks, as in training (masks.kind in configs/demo.yaml)


@dataclass
class DemoOptions:
    output: Path = Path("demo_output")
    crop_size: int = 64  # side of the held-out images (the training crop size of configs/demo.yaml)
    train_per_source: int = 32  # random crops per training source image
    held_out_per_source: int = 8  # crops per held-out source image
    seed: int = 0
    overrides: tuple[str, ...] = ()  # extra `--set key.path=value` for `deepfill train`


def load_source(name: str) -> np.ndarray:
    """One of scikit-image's bundled images as uint8 (H, W, 3) RGB."""
    import skimage.data

    image = getattr(skimage.data, name)()
    if name == "stereo_motorcycle":
        image = image[0]  # (left, right, disparity): the left view
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8) if image.dtype.kind == "f" else image.astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)  # (H, W) -> (H, W, 3)
    return np.ascontiguousarray(image[:, :, :3])


def random_crops(image: np.ndarray, count: int, min_side: int, max_side: int, out_side: int | None,
                 rng: np.random.Generator) -> list[np.ndarray]:
    """``count`` square crops of side in [min_side, max_side] at random positions of ``image`` (H, W, 3);
    each is resized to ``out_side`` (area filter) when given, else kept at its own size."""
    from PIL import Image

    h, w = image.shape[:2]
    crops = []
    for _ in range(count):
        side = int(rng.integers(min_side, min(max_side, h, w) + 1))
        y = int(rng.integers(0, h - side + 1))
        x = int(rng.integers(0, w - side + 1))
        crop = image[y : y + side, x : x + side]
        if out_side is not None and side != out_side:
            crop = np.asarray(Image.fromarray(crop).resize((out_side, out_side), Image.Resampling.BOX))
        crops.append(crop)
    return crops


def build_dataset(root: Path, opts: DemoOptions) -> dict[str, int]:
    """Write ``root/train/<source>/<i>.png`` and ``root/held_out/<i>_<source>.png``; return the counts.

    Training crops have random sides in [crop, 4 * crop] (kept at that size: the training pipeline cuts its
    own crop_size crops, scaling up anything smaller), so the model sees each picture at several scales.
    Held-out crops are cut at a random side in [crop, 3 * crop] and resized to exactly crop x crop, from
    source images that contribute nothing to training.
    """
    from PIL import Image

    rng = np.random.default_rng(opts.seed)
    counts = {"train": 0, "held_out": 0}
    for name in TRAIN_SOURCES:
        folder = root / "train" / name
        folder.mkdir(parents=True, exist_ok=True)
        image = load_source(name)
        for i, crop in enumerate(random_crops(image, opts.train_per_source, opts.crop_size, 4 * opts.crop_size,
                                              None, rng)):
            Image.fromarray(crop).save(folder / f"{i:03d}.png")
            counts["train"] += 1
    folder = root / "held_out"
    folder.mkdir(parents=True, exist_ok=True)
    for name in HELD_OUT_SOURCES:
        image = load_source(name)
        for i, crop in enumerate(random_crops(image, opts.held_out_per_source, opts.crop_size, 3 * opts.crop_size,
                                              opts.crop_size, rng)):
            Image.fromarray(crop).save(folder / f"{i:02d}_{name}.png")  # sorted keys alternate the sources
            counts["held_out"] += 1
    return counts


def commands(opts: DemoOptions) -> list[tuple[str, list[str]]]:
    """The ``deepfill`` commands the demo runs, in order, as (title, argv after ``deepfill``).

    Paths are absolute: Ray Train runs its workers in their own working directories."""
    out = opts.output.resolve()
    model = f"models:/{MODEL_NAME}@{ALIAS}"
    return [
        ("prepare: validate the images into Parquet shards", [
            "prepare", "--src", str(out / "images" / "train"), "--dst", str(out / "shards"),
            "--min-size", str(opts.crop_size), "--val-fraction", "0.05",
        ]),
        ("train: DeepFill v1 on Ray Train, 2 CPU workers (DDP), MLflow on sqlite:///mlflow.db", [
            "train", "--config", CONFIG,
            "--set", f"data.shards={out / 'shards'}",
            "--set", f"checkpoint.storage_path={out / 'ray_results'}",
            *[a for o in opts.overrides for a in ("--set", o)],
        ]),
        ("infer: inpaint the held-out images with the registered model", [
            "infer", "--images", str(out / "images" / "held_out"), "--output", str(out / "inpainted"),
            "--model", model, "--mask-preset", MASK_PRESET, "--seed", "0", "--num-actors", "2",
        ]),
        ("evaluate: ours vs OpenCV Telea and Navier-Stokes on the same masks", [
            "evaluate", "--images", str(out / "images" / "held_out"), "--model", model,
            "--mask-preset", MASK_PRESET, "--seed", "0", "--size", str(opts.crop_size),
            "--output", str(out / "report"),
        ]),
    ]


def start_ray() -> None:
    """One local Ray instance for every step (4 logical CPUs: two training workers plus the data tasks
    sharing this machine's cores), so each command finds it instead of starting its own; its dashboard on
    127.0.0.1:8265 (``pipeline.cluster.connect`` says why)."""
    from pipeline.cluster import connect

    connect(num_cpus=4)


def run_step(index: int, total: int, title: str, argv: list[str]) -> float:
    """Run ``deepfill <argv>`` through the real command line (in this process); return seconds taken."""
    from jobs.cli import main as deepfill

    banner = f"[{index}/{total}] {title}"
    print(f"\n{'=' * len(banner)}\n{banner}\n{'=' * len(banner)}\n$ deepfill {shlex.join(argv)}", flush=True)
    started = time.perf_counter()
    code = deepfill(list(argv))
    seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"demo: `deepfill {argv[0]}` failed with exit code {code} after {seconds:.0f} s")
    print(f"-- {argv[0]} done in {seconds:.0f} s", flush=True)
    return seconds


def summary(opts: DemoOptions, timings: dict[str, float], total: float | None = None) -> str:
    """The closing summary: metrics table from the evaluate report, where things are, how to look."""
    out = opts.output
    report = out / "report"
    total = sum(timings.values()) if total is None else total
    lines = ["", f"deepfill-ray demo: done in {total:.0f} s ("
             + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ")", ""]
    metrics = report / "metrics.json"
    if metrics.is_file():
        result = json.loads(metrics.read_text())
        lines.append(f"held-out images: {result.get('count', '?')}, {MASK_PRESET} masks, seed 0 "
                     "(means; l1/l2 on [0, 1], psnr in dB):")
        lines += format_metrics(result)
    table = report / "report.md"
    lines += [
        "",
        f"inpainted held-out images: {out / 'inpainted'}",
        f"evaluation report:         {table if table.is_file() else report}",
        f"picture grid:              {report / 'grid.png'}",
        f"registered model:          models:/{MODEL_NAME}@{ALIAS}",
        "",
        "look at the run, its metrics, picture grids and the registered model:",
        "  .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db",
        "  then open http://127.0.0.1:5000",
    ]
    return "\n".join(lines)


def format_metrics(metrics: dict) -> list[str]:
    """A small text table, one row per method, from ``{"mean": {method: {metric: value}}}``."""
    means = metrics.get("mean", metrics)
    methods = [m for m in means if isinstance(means[m], dict)]
    if not methods:
        return []
    names = list(means[methods[0]])
    head = f"{'method':<14}" + "".join(f"{n:>12}" for n in names)
    rows = [head, "-" * len(head)]
    for m in methods:
        rows.append(f"{m:<14}" + "".join(f"{means[m].get(n, float('nan')):>12.4f}" for n in names))
    return rows


def parse_args(argv: list[str] | None) -> DemoOptions:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="demo_output", help="output folder, recreated (default demo_output)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="passed on to `deepfill train`, e.g. --set steps=1000 (repeatable)")
    args = parser.parse_args(argv)
    return DemoOptions(output=Path(args.output), overrides=tuple(args.overrides))


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = time.perf_counter()
    if opts.output.exists():
        shutil.rmtree(opts.output)
    steps = commands(opts)
    total = len(steps) + 1
    banner = f"[1/{total}] dataset: random crops of scikit-image's bundled photos and textures"
    print(f"{'=' * len(banner)}\n{banner}\n{'=' * len(banner)}", flush=True)
    counts = build_dataset(opts.output / "images", opts)
    timings = {"dataset": time.perf_counter() - started}
    print(f"{counts['train']} training images from {len(TRAIN_SOURCES)} sources in {opts.output / 'images' / 'train'}; "
          f"{counts['held_out']} held-out images from {', '.join(HELD_OUT_SOURCES)} in "
          f"{opts.output / 'images' / 'held_out'}", flush=True)
    ray_started = time.perf_counter()
    start_ray()
    timings["ray start"] = time.perf_counter() - ray_started
    for i, (title, argv_) in enumerate(steps, start=2):
        timings[argv_[0]] = run_step(i, total, title, argv_)
    print(summary(opts, timings, time.perf_counter() - started), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
