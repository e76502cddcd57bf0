"""``deepfill serve`` under load: closed-loop HTTP clients against a real Serve app, batching on and off.

    python benchmarks/serve.py [--requests 48] [--sizes 256,512] [--concurrency 1,4,16] [--cnum 32]
        [--max-batch-size 8] [--batch-wait-timeout-s 0.02] [--replica-cpus 2]

One local Ray, one Serve proxy on 127.0.0.1, one replica (``--replica-cpus`` CPUs, as many torch threads)
serving a generator of width ``--cnum`` with random weights. The same app is deployed twice, one after the
other: batching on (``--max-batch-size``) and off (``--no-batching``, one request per forward pass). For each
image size and concurrency C, C client threads each send their next request as soon as the previous one is
answered (closed loop; multipart PNG image + mask, a box hole of 1/16 of the image) until ``--requests``
requests are answered. Reported per point: throughput (requests/s over the wall time), p50 / p99 latency (s),
errors (any answer that is not a 200 PNG of the image's size; goal 0), and the replica's mean batch size
(from ``GET /model``). ``speedup`` is batching-on throughput / batching-off throughput per point; the goal
is >= 1.3x at concurrency 16. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import sys
import tempfile
import threading
import time

# run as a script, this folder comes first on sys.path, and its sibling benchmark files (e.g. pipeline.py)
# would shadow the project's packages of the same name
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(size: int) -> tuple[bytes, bytes]:
    """(image PNG, mask PNG) of size x size: a photo (scikit-image's astronaut, resized) and a box hole."""
    from PIL import Image

    try:
        import skimage.data

        image = Image.fromarray(skimage.data.astronaut()).resize((size, size), Image.BILINEAR)
    except ImportError:  # pragma: no cover - scikit-image is a test dependency
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4: size // 2, size // 4: size // 2] = 255
    out = []
    for picture in (image, Image.fromarray(mask)):
        buf = io.BytesIO()
        picture.save(buf, "PNG")
        out.append(buf.getvalue())
    return out[0], out[1]


def closed_loop(url: str, image: bytes, mask: bytes, size: int, concurrency: int, total: int) -> dict:
    """``concurrency`` clients, each sending its next request when the last is answered, until ``total``."""
    import requests
    from PIL import Image

    latencies: list[float] = []
    errors = [0]
    left = [total]
    lock = threading.Lock()

    def client():
        session = requests.Session()
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            t0 = time.perf_counter()
            try:
                r = session.post(url + "/inpaint", files={"image": ("i.png", image), "mask": ("m.png", mask)},
                                 timeout=600)
                ok = (r.status_code == 200 and r.headers.get("content-type") == "image/png"
                      and Image.open(io.BytesIO(r.content)).size == (size, size))
            except Exception:  # noqa: BLE001 - counted
                ok = False
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                errors[0] += 0 if ok else 1

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.asarray(latencies)
    return {"requests": total, "wall_s": round(wall, 2), "throughput_rps": round(total / wall, 3),
            "p50_s": round(float(np.percentile(lat, 50)), 3), "p99_s": round(float(np.percentile(lat, 99)), 3),
            "errors": errors[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=48, help="requests per (size, concurrency) point")
    p.add_argument("--sizes", default="256,512", help="square image sizes")
    p.add_argument("--concurrency", default="1,4,16", help="closed-loop client counts")
    p.add_argument("--cnum", type=int, default=32, help="generator width (random weights)")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.02)
    p.add_argument("--replica-cpus", type=float, default=2.0, help="CPUs (and torch threads) of the replica")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    concurrency = [int(c) for c in args.concurrency.split(",")]

    import ray
    import requests
    import torch
    from ray import serve

    import models
    import models.checkpoint
    from jobs.serve import ServeOptions, build_app

    tmp = tempfile.mkdtemp(prefix="bench_serve_")
    path = os.path.join(tmp, "generator.pt")
    torch.manual_seed(0)
    models.checkpoint.save_generator(path, models.InpaintGenerator(cnum=args.cnum))
    stdout = os.dup(1)  # Ray's and Serve's own lines go to stderr: stdout holds the one JSON object
    os.dup2(2, 1)
    ray.init(address="local", num_cpus=max(4, int(args.replica_cpus) + 1), include_dashboard=False,
             log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    url = f"http://127.0.0.1:{port}"
    inputs = {s: _inputs(s) for s in sizes}
    results: dict = {}
    try:
        for mode, batching in (("batching", True), ("no_batching", False)):
            opts = ServeOptions(model=path, port=port, batching=batching, max_batch_size=args.max_batch_size,
                                batch_wait_timeout_s=args.batch_wait_timeout_s,
                                num_cpus_per_replica=args.replica_cpus, poll_s=0)
            serve.run(build_app(opts), name=f"bench-{mode}", route_prefix="/", blocking=False)
            for s in sizes:  # warm-up: first forward pass of each size
                closed_loop(url, *inputs[s], s, 1, 1)
            results[mode] = {}
            for s in sizes:
                for c in concurrency:
                    before = requests.get(url + "/model", timeout=30).json()["stats"]
                    point = closed_loop(url, *inputs[s], s, c, args.requests)
                    after = requests.get(url + "/model", timeout=30).json()["stats"]
                    batches = after["batches"] - before["batches"]
                    point["mean_batch"] = round((after["requests"] - before["requests"]) / max(1, batches), 2)
                    results[mode][f"{s}x{s}@c{c}"] = point
                    print(f"{mode} {s}x{s} c={c}: {point}", file=sys.stderr, flush=True)
            serve.delete(f"bench-{mode}")
    finally:
        serve.shutdown()
        ray.shutdown()
        sys.stdout.flush()
        os.dup2(stdout, 1)
    speedup = {k: round(results["batching"][k]["throughput_rps"] / results["no_batching"][k]["throughput_rps"], 3)
               for k in results["batching"]}
    c16 = {k: v for k, v in speedup.items() if k.endswith(f"@c{max(concurrency)}")}
    print(json.dumps({
        "config": {"requests": args.requests, "sizes": sizes, "concurrency": concurrency, "cnum": args.cnum,
                   "max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s,
                   "replica_cpus": args.replica_cpus, "cpu_count": os.cpu_count(),
                   "cuda": torch.cuda.is_available()},
        "results": results,
        "speedup": speedup,
        "goal": {"speedup_at_max_concurrency": 1.3, "met": all(v >= 1.3 for v in c16.values()),
                 "errors": sum(p["errors"] for m in results.values() for p in m.values())},
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
