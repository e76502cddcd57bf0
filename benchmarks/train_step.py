"""One full training iteration (n_critic critic steps + one generator step) on this CPU, and the share of step
time a 2-worker Ray Train run spends waiting for data. Prints one JSON object.

1. ``iteration``: images/s of ``models.gan`` critic_step x n_critic + generator_step at 256x256, batch 8,
   cnum 32 (the reference networks), with our batched contextual attention against the same iteration whose
   generator uses a per-sample-loop attention in the references' style (``reference_attention`` from
   models/reference.py). Variants alternate; medians over ``--repeats`` after one warm-up.
   An iteration consumes (n_critic + 1) * batch images.
2. ``ray``: a short ``jobs.train.train`` run on local Ray, 2 CPU workers, real shards (the test photos,
   prepared to a temp folder), reporting the data-wait share of the steady-state window (the first window,
   which includes start-up, is reported too). Goal: < 5 %.

    .venv/bin/python benchmarks/train_step.py [--repeats 2] [--n-critic 5] [--threads N] [--skip-ray] [--skip-iteration]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "benchmarks"))  # after the project root: benchmarks/pipeline.py must not shadow the package

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import models  # noqa: E402
from models.gan import GanOptions, critic_step, generator_step  # noqa: E402
from models.reference import reference_attention  # noqa: E402

SIZE, BATCH = 256, 8


class LoopAttention(nn.Module):
    """The references' per-sample attention behind the generator's interface (every row attends)."""

    def forward(self, f, b, mask, rows=None):
        return reference_attention(f, b, mask)  # y (B, C, H, W), offsets (B, 2, H/2, W/2)


def _batches(n: int, seed: int = 0):
    """n batches of smooth random pictures with per-sample 128x128-ish box holes and their discount weights."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        low = torch.rand(BATCH, 3, SIZE // 16, SIZE // 16, generator=g) * 2 - 1
        image = nn.functional.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        mask = torch.zeros(BATCH, 1, SIZE, SIZE)
        for i in range(BATCH):
            h, w = (int(v) for v in torch.randint(96, 129, (2,), generator=g))
            y, x = (int(v) for v in torch.randint(0, SIZE - 128, (2,), generator=g))
            mask[i, :, y:y + h, x:x + w] = 1
        out.append((image, mask, models.losses.spatial_discount(mask, 0.9)))
    return out


def bench_iteration(repeats: int, n_critic: int) -> dict:
    def build(loop: bool):
        torch.manual_seed(0)
        gen = models.InpaintGenerator(cnum=32)
        if loop:
            gen.attention = LoopAttention()
        local, glob = models.local_critic(64, SIZE // 2), models.global_critic(64, SIZE)
        opt_g = torch.optim.Adam(gen.parameters(), lr=1e-4, betas=(0.5, 0.9))
        opt_d = torch.optim.Adam(list(local.parameters()) + list(glob.parameters()), lr=1e-4, betas=(0.5, 0.9))
        return gen, local, glob, opt_g, opt_d

    variants = {"ours": build(False), "loop": build(True)}
    data = _batches(n_critic + 1)
    gan = GanOptions()

    def iteration(nets) -> float:
        gen, local, glob, opt_g, opt_d = nets
        t = time.perf_counter()
        for image, mask, _ in data[:n_critic]:
            critic_step(gen, local, glob, opt_d, image, mask, local_size=SIZE // 2, gan=gan)
        image, mask, weight = data[n_critic]
        generator_step(gen, local, glob, opt_g, image, mask, weight, local_size=SIZE // 2, gan=gan)
        return time.perf_counter() - t

    times = {k: [] for k in variants}
    for k, nets in variants.items():  # warm-up
        iteration(nets)
    for _ in range(repeats):
        for k, nets in variants.items():
            times[k].append(iteration(nets))
    images = (n_critic + 1) * BATCH
    out = {"size": SIZE, "batch": BATCH, "n_critic": n_critic, "images_per_iteration": images,
           "repeats": repeats, "threads": torch.get_num_threads()}
    for k, ts in times.items():
        out[f"{k}_iteration_s"] = round(statistics.median(ts), 3)
        out[f"{k}_images_per_s"] = round(images / statistics.median(ts), 3)
    out["speedup_vs_loop"] = round(out["loop_iteration_s"] / out["ours_iteration_s"], 3)
    return out


def bench_ray(steps: int) -> dict:
    import ray

    from jobs.options import load_config
    from jobs.train import TrainConfig, train
    from pipeline.shards import prepare
    from tests.imaging import write_good_images

    tmp = Path(tempfile.mkdtemp(prefix="deepfill-bench-train-"))
    try:
        src = tmp / "src"
        for copy in range(4):  # 16 photos: the 4 test photos under 4 keys each
            write_good_images(src / f"copy{copy}")
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        prepare(str(src), str(tmp / "shards"), val_fraction=0.0, min_size=128, progress=False)
        half = steps // 2
        cfg = load_config(TrainConfig, ROOT / "configs" / "tiny.yaml", [
            f"data.shards={tmp / 'shards'}", "data.crop_size=128", "model.cnum=16", "model.critic_cnum=16",
            "batch_size=4", "gan.n_critic=5", f"steps={steps}", f"log_every={half}", f"checkpoint.every={steps}",
            "val_every=0", "tracking.log_model=false", f"checkpoint.storage_path={tmp / 'runs'}",
            f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", "name=bench",
        ])
        t = time.perf_counter()
        result = train(cfg)
        wall = time.perf_counter() - t
        import mlflow

        client = mlflow.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
        share = {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, "data_wait_share")}
        ips = {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, "images_per_s")}
        return {"workers": 2, "crop": 128, "cnum": 16, "batch_per_worker": 4, "n_critic": 5, "steps": steps,
                "data_wait_share_first_window": round(share[half], 4),
                "data_wait_share_steady": round(share[steps], 4),
                "images_per_s_steady": round(ips[steps], 3), "job_wall_s": round(wall, 1)}
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--n-critic", type=int, default=5)
    parser.add_argument("--ray-steps", type=int, default=8)
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--skip-iteration", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {"cpu_count": os.cpu_count(), "torch": torch.__version__}
    if not args.skip_iteration:
        out["iteration"] = bench_iteration(args.repeats, args.n_critic)
    if not args.skip_ray:
        out["ray"] = bench_ray(args.ray_steps)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
