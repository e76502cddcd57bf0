"""Checkpoints off the critical path: the share of training time spent checkpointing, sync against async
upload, on a real S3 endpoint on 127.0.0.1 (moto); and what the per-step preemption check costs.

    python benchmarks/checkpoint.py [--steps 12] [--repeats 3] [--cnum 32] [--critic-cnum 64] [--workers 1]

Each run is a real ``deepfill train`` job (Ray Train, local Ray) on shards of scikit-image's photos in the
local bucket, with its checkpoints in that bucket too, one checkpoint at EVERY step (the worst case; a real
job checkpoints every ``checkpoint.every`` = 1000 steps). The DeepFill v1 widths (cnum 32, critics 64) make
a checkpoint of the real size (networks + both Adam states). The runs, interleaved (sync, async, sync, ...):

- ``sync``: ``checkpoint.upload=sync``, the reporting step waits for the upload;
- ``async``: ``checkpoint.upload=async`` (Ray Train's ``CheckpointUploadMode.ASYNC``): the step waits for
  the local write only, the upload runs in the background;
- ``no_preemption_check``: async with ``checkpoint.on_preemption=false`` (no ``get_preemption_info``
  barrier per step): the difference in step time is the check's cost.

Reported per mode, medians over ``--repeats`` runs: ``checkpoint_time_share`` (the trainer's own measure:
time writing + reporting checkpoints / the worker group's wall time), ``seconds_per_step`` (the job's wall
time from its first to its last step / steps: what a user waits for) and the checkpoint size. Prints one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "WHEN_REQUIRED")


def start_s3() -> tuple[object, str]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per S3 request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)
    return server, endpoint


def make_shards(bucket: str, workdir: str) -> str:
    """40 crops of scikit-image's photos (``make demo``'s), prepared into ``s3://<bucket>/shards``."""
    from pathlib import Path

    from jobs.demo import DemoOptions, build_dataset
    from pipeline.shards import prepare

    src = Path(workdir) / "src"
    build_dataset(src, DemoOptions(output=Path(workdir), train_per_source=4))
    prepare(str(src / "train"), f"s3://{bucket}/shards", val_fraction=0.0, min_size=64, progress=False)
    return f"s3://{bucket}/shards"


def one_run(mode: str, args, shards: str, bucket: str, workdir: str) -> dict:
    from jobs import train as T
    from jobs.options import load_config
    from pipeline import storage

    name = f"{mode}-{uuid.uuid4().hex[:6]}"
    sets = [f"steps={args.steps}", "batch_size=2", f"name={name}", "val_every=0", "log_every=1",
            f"model.cnum={args.cnum}", f"model.critic_cnum={args.critic_cnum}", "data.crop_size=64",
            f"data.shards={shards}", f"checkpoint.storage_path=s3://{bucket}/runs", "checkpoint.every=1",
            "checkpoint.num_to_keep=2", f"scaling.num_workers={args.workers}",
            f"tracking.uri=sqlite:///{workdir}/mlflow.db", "tracking.log_model=false",
            f"checkpoint.upload={'sync' if mode == 'sync' else 'async'}",
            f"checkpoint.on_preemption={'false' if mode == 'no_preemption_check' else 'true'}"]
    cfg = load_config(T.TrainConfig, os.path.join(os.path.dirname(_HERE), "configs", "tiny.yaml"), sets)
    t0 = time.perf_counter()
    result = T.train(cfg)
    wall = time.perf_counter() - t0
    import mlflow

    client = mlflow.MlflowClient(cfg.tracking.uri)
    history = {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, "step_time_s")}
    sizes = storage.list_sizes(storage.join(T.storage_uri(cfg), f"checkpoint_step_{args.steps:08d}"))
    return {"checkpoint_time_share": result.metrics["checkpoint_time_share"],
            "step_time_s": statistics.median(history[s] for s in sorted(history)[1:]),
            "job_wall_s": wall, "checkpoint_mib": sum(sizes.values()) / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cnum", type=int, default=32)
    parser.add_argument("--critic-cnum", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)

    server, endpoint = start_s3()
    import ray
    import s3fs

    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(endpoint_url=endpoint).mkdir(bucket)
    modes = ("sync", "async", "no_preemption_check")
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(prefix="deepfill-bench-ckpt-") as workdir:
        try:
            ray.init(address="local", num_cpus=args.workers + 3, include_dashboard=False, log_to_driver=False)
            shards = make_shards(bucket, workdir)
            for _ in range(args.repeats):
                for mode in modes:
                    runs[mode].append(one_run(mode, args, shards, bucket, workdir))
        finally:
            ray.shutdown()
            server.stop()
    out = {"benchmark": "checkpoint", "steps": args.steps, "repeats": args.repeats, "cnum": args.cnum,
           "critic_cnum": args.critic_cnum, "workers": args.workers, "checkpoint_every": 1,
           "storage": "s3 (moto on 127.0.0.1)", "modes": {}}
    for mode, rows in runs.items():
        out["modes"][mode] = {k: round(statistics.median(r[k] for r in rows), 4) for k in rows[0]}
    sync, asy, nocheck = (out["modes"][m] for m in modes)
    out["async_vs_sync_checkpoint_share"] = round(asy["checkpoint_time_share"] / sync["checkpoint_time_share"], 3)
    out["preemption_check_step_time_ratio"] = round(asy["step_time_s"] / nocheck["step_time_s"], 3)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
