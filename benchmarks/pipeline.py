"""Throughput of the training data path, printed as JSON.

Images per second, side by side in one run on the same ~512 px JPEGs (made from scikit-image's photos):

- ``ray_data``: pipeline.datasets.build_train_dataset (Parquet shards -> decode + augment + mask + loss
  weights in a pool of 2 Ray Data actors) on a local Ray with 2 CPUs, consumed with iter_torch_batches and
  a local shuffle buffer as a trainer does;
- ``pil_decode``: the decode limit: the same JPEGs decoded by PIL in a tight loop on 2 processes;
- ``dataloader``: a torch DataLoader with 2 workers running the same per-sample work (make_sample).

Each figure is the median of ``--repeats`` timed passes after one warm-up pass. Goals: ray_data >= 0.7x
pil_decode and >= 1.0x dataloader. The machine's load average is printed too: on a shared machine, read
the ratios (measured in the same run) rather than the absolute figures.

    python benchmarks/pipeline.py [--images 192] [--repeats 3] [--crop 256]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

CPUS = 2


def make_jpegs(n: int, seed: int = 0) -> dict[str, bytes]:
    """``n`` JPEGs of about 512 px (random crops / flips / scales of scikit-image photos), quality 90."""
    import skimage.data

    rng = np.random.default_rng(seed)
    sources = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field"):
        img = getattr(skimage.data, name)()
        sources.append(Image.fromarray(np.ascontiguousarray(img[..., :3])).resize((768, 640)))
    out = {}
    for i in range(n):
        src = sources[i % len(sources)]
        w, h = int(rng.integers(512, 640)), 512
        x, y = int(rng.integers(0, 768 - w + 1)), int(rng.integers(0, 640 - h + 1))
        img = src.crop((x, y, x + w, y + h))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out[f"img/{i:05d}.jpg"] = buf.getvalue()
    return out


def write_shards(images: dict[str, bytes], root: str, files: int = 4) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.shards import _schema

    keys = sorted(images)
    os.makedirs(f"{root}/train", exist_ok=True)
    for f in range(files):
        part = keys[f::files]
        table = pa.table({"key": part, "image": [images[k] for k in part], "height": [512] * len(part),
                          "width": [0] * len(part), "format": ["JPEG"] * len(part)}, schema=_schema())
        pq.write_table(table, f"{root}/train/part-{f:05d}-of-{files:05d}.parquet", row_group_size=32)


# ------------------------------------------------------------------------------------------- (a) decode limit

def _decode_all(blobs: list[bytes]) -> int:
    for b in blobs:
        np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
    return len(blobs)


def bench_pil(blobs: list[bytes], repeats: int) -> float:
    with get_context("spawn").Pool(CPUS) as pool:
        pool.map(_decode_all, [blobs[i::CPUS] for i in range(CPUS)])  # warm-up
        rates = []
        for _ in range(repeats):
            t = time.perf_counter()
            n = sum(pool.map(_decode_all, [blobs[i::CPUS] for i in range(CPUS)]))
            rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


# ------------------------------------------------------------------------------------------- (b) DataLoader

class _SampleDataset:
    def __init__(self, items, data, masks):
        self.items, self.data, self.masks = items, data, masks

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        import torch

        from pipeline.datasets import make_sample

        key, blob = self.items[i]
        img, m, w = make_sample(blob, key, 0, self.data, self.masks)
        return {"image": torch.from_numpy(img), "mask": torch.from_numpy(m[..., None]),
                "weight": torch.from_numpy(w[..., None])}


def _worker_init(_):
    import cv2
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def bench_dataloader(images: dict[str, bytes], data, masks, repeats: int, batch: int) -> float:
    import torch

    ds = _SampleDataset(sorted(images.items()), data, masks)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=CPUS, drop_last=True,
                                         persistent_workers=True, worker_init_fn=_worker_init,
                                         multiprocessing_context="spawn")
    for _ in loader:  # warm-up: starts the workers
        pass
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        n = sum(b["image"].shape[0] for b in loader)
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


# ------------------------------------------------------------------------------------------- Ray Data

def bench_ray(root: str, data, masks, repeats: int, batch: int, n_images: int) -> float:
    """Steady-state images/s of one training stream of ``repeats + 2`` epochs: the first epoch (actor
    start-up) and the last (which drains blocks made ahead during the one before) are excluded; the rate
    of each epoch between is one sample and the median is returned."""
    import ray

    from pipeline.datasets import build_train_dataset

    ray.init(address="local", num_cpus=CPUS, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        ds = build_train_dataset(data, masks, epochs=repeats + 2)
        marks, n = [], 0
        for b in ds.iter_torch_batches(batch_size=batch, local_shuffle_buffer_size=data.shuffle_buffer,
                                       drop_last=True):
            n += b["image"].shape[0]
            if n >= n_images * (len(marks) + 1) - batch // 2:  # an epoch's worth of images delivered
                marks.append(time.perf_counter())
        rates = [n_images / (t1 - t0) for t0, t1 in zip(marks, marks[1:])][:repeats]
        return statistics.median(rates)
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    from pipeline.config import DataConfig, MaskConfig

    images = make_jpegs(args.images)
    with tempfile.TemporaryDirectory() as root:
        write_shards(images, root)
        # as many decode actors as the DataLoader has workers
        data = DataConfig(shards=root, crop_size=args.crop, shuffle_buffer=2 * args.batch, batch_rows=16,
                          decode_workers=CPUS)
        masks = MaskConfig(kind="mixed", seed=0)
        load_before = os.getloadavg()[0]
        pil = bench_pil(list(images.values()), args.repeats)
        loader = bench_dataloader(images, data, masks, args.repeats, args.batch)
        ray_ips = bench_ray(root, data, masks, args.repeats, args.batch, args.images)
        result = {
            "benchmark": "pipeline",
            "images": args.images,
            "jpeg_px": "512 x 512..639",
            "crop": args.crop,
            "cpus": CPUS,
            "repeats": args.repeats,
            "ray_data_images_per_s": round(ray_ips, 1),
            "pil_decode_images_per_s": round(pil, 1),
            "dataloader_images_per_s": round(loader, 1),
            "ray_vs_decode": round(ray_ips / pil, 3),
            "ray_vs_dataloader": round(ray_ips / loader, 3),
            "goals": {"ray_vs_decode": 0.7, "ray_vs_dataloader": 1.0},
            "load_average_before_after": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
