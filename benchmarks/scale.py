"""Bucket-scale planning: the driver's time and peak memory per key when `prepare` and `infer` plan 10k, 100k
and 1M keys.

    python benchmarks/scale.py [--sizes 10000,100000,1000000] [--tree 10000]

Each measurement runs in a fresh subprocess, so its peak RSS (``ru_maxrss``) belongs to that one task; the
figure reported is the increase over the same process just before planning (imports done, nothing listed),
divided by the key count. The listings are synthetic ``pipeline.storage.Entry`` streams (keys like
``d0421/img_00123456.jpg`` with a size and an ETag-like version), fed to the same pure planners the jobs call:

- ``prepare``: ``pipeline.shards.plan_shards`` (split and shard of every key, each shard's fingerprint), 192 MB
  shards, val fraction 0.01.
- ``infer``: ``jobs.infer.plan_entries`` with masks drawn from a preset, an output tree holding half of the
  outputs and an earlier manifest (``Previous``) with a row for each of them whose fingerprint differs (so
  every key is planned to run, the costliest case), the run rows gathered into the Arrow table the job sends
  to its actors (``jobs.infer._TodoTable``), as ``run_infer`` does.
- ``listing``: ``pipeline.storage.iter_entries`` over a real local tree of ``--tree`` empty files (hidden
  names included), to show the listing itself streams.

Goal (issue #8): both planners grow at most linearly, under 1 KB of driver memory per key. Prints one JSON
object: for each planner and size, seconds, keys per second, peak RSS increase in MB, bytes per key, and the
marginal bytes per key between one size and the next (the slope, free of fixed costs such as Arrow's
allocator); ``within_goal`` judges the bytes per key at the largest size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

# run as a script, this folder comes first on sys.path, and its sibling benchmark files (e.g. pipeline.py)
# would shadow the project's packages of the same name
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0]) == _HERE:
    sys.path.pop(0)
sys.path.insert(0, os.path.dirname(_HERE))


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _entries(n: int):
    from pipeline.storage import Entry

    for i in range(n):
        yield Entry(f"d{i % 1000:04d}/img_{i:08d}.jpg", 150_000 + (i * 7919) % 100_000, f"{i * 2654435761:032x}")


def _measure_prepare(n: int) -> dict:
    from pipeline.shards import plan_shards

    base = _rss_bytes()
    t0 = time.perf_counter()
    plan = plan_shards(_entries(n), shard_size_bytes=192 * 2**20, val_fraction=0.01, seed=0, min_size=256)
    seconds = time.perf_counter() - t0
    return {"keys": n, "shards": len(plan.shards), "seconds": seconds, "peak_increase": _rss_bytes() - base}


def _measure_infer(n: int) -> dict:
    from jobs.infer import PlanSettings, Previous, _TodoTable, output_key, plan_entries
    from pipeline.storage import Entry

    settings = PlanSettings(model_sha256="ab" * 32, mask_preset="box", seed=0)
    warm = _TodoTable()  # Arrow's allocator and the first table: a fixed cost, before the baseline
    warm.add({"key": "x"})
    warm._flush()
    base = _rss_bytes()
    t0 = time.perf_counter()
    previous = Previous()
    for i, e in enumerate(_entries(n)):
        if i % 2 == 0:
            previous.add(e.key, f"{i:016x}", model_sha256=settings.model_sha256, model_name="deepfill",
                         model_version="3")
    outputs = (Entry(output_key(e.key), 4096, "v") for i, e in enumerate(_entries(n)) if i % 2 == 0)
    todo, actions = _TodoTable(), {}
    for action, row in plan_entries(_entries(n), outputs, previous, settings):
        actions[action] = actions.get(action, 0) + 1
        if action == "run":
            todo.add(row)
    todo._flush()
    seconds = time.perf_counter() - t0
    return {"keys": n, "actions": actions, "seconds": seconds, "peak_increase": _rss_bytes() - base}


def _measure_listing(n: int) -> dict:
    from pipeline import storage

    with tempfile.TemporaryDirectory() as root:
        for i in range(n):
            folder = os.path.join(root, f"d{i % 100:03d}")
            if i < 100:
                os.makedirs(folder)
            name = f".hidden_{i:07d}.jpg" if i % 50 == 0 else f"img_{i:07d}.jpg"
            open(os.path.join(folder, name), "wb").close()
        base = _rss_bytes()
        t0 = time.perf_counter()
        count = sum(1 for _ in storage.iter_entries(root, hidden=True))  # streamed: nothing kept
        seconds = time.perf_counter() - t0
        assert count == n, (count, n)
        return {"keys": n, "seconds": seconds, "peak_increase": _rss_bytes() - base}


_MEASURES = {"prepare": _measure_prepare, "infer": _measure_infer, "listing": _measure_listing}


def _child(kind: str, n: int) -> None:
    import jobs.infer  # noqa: F401 - imports before the baseline
    import pipeline.shards  # noqa: F401

    print(json.dumps(_MEASURES[kind](n)))


def _run(kind: str, n: int) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind, str(n)], check=True,
                         capture_output=True, text=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    got["seconds"] = round(got["seconds"], 2)
    got["keys_per_s"] = round(n / max(got["seconds"], 1e-9))
    got["peak_increase_mb"] = round(got.pop("peak_increase") / 2**20, 1)
    got["bytes_per_key"] = round(got["peak_increase_mb"] * 2**20 / n)
    return got


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="key counts, comma separated")
    parser.add_argument("--tree", type=int, default=10000, help="files in the real local tree listed (0 = skip)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], int(args.child[1]))
        return 0
    sizes = [int(s) for s in args.sizes.split(",") if s]
    result = {"goal": "linear growth, < 1024 bytes of driver memory per key",
              "prepare_planning": [_run("prepare", n) for n in sizes],
              "infer_planning": [_run("infer", n) for n in sizes]}
    if args.tree:
        result["local_listing"] = _run("listing", args.tree)
    for k in ("prepare_planning", "infer_planning"):  # the slope between sizes: the cost of one more key
        rows = result[k]
        for small, big in zip(rows, rows[1:]):
            big["marginal_bytes_per_key"] = round(
                (big["peak_increase_mb"] - small["peak_increase_mb"]) * 2**20 / (big["keys"] - small["keys"]))
    worst = max(r["bytes_per_key"] for k in ("prepare_planning", "infer_planning") for r in result[k][-1:])
    result["bytes_per_key_at_largest"] = worst
    result["within_goal"] = worst < 1024
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
