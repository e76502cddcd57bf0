"""Inference of one 1024x1024 and one 2048x2048 image through models.inpaint on CPU (cnum 32, random
weights): seconds and peak RSS. Each size runs in a fresh subprocess so the peaks are separate (ru_maxrss of
the child). Goal: 2048x2048 under 8 GB peak RSS. Prints one JSON object.

    .venv/bin/python benchmarks/inpaint_large.py [--sizes 1024 2048] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import InpaintGenerator, inpaint  # noqa: E402


def run_size(size: int) -> dict:
    torch.manual_seed(0)
    gen = InpaintGenerator(cnum=32)
    image = torch.rand(1, 3, size, size) * 2 - 1
    mask = torch.zeros(1, 1, size, size)
    mask[:, :, size // 4:size // 2, size // 3:size // 3 + size // 4] = 1  # a box
    mask[:, :, 3 * size // 4:3 * size // 4 + size // 16, : size // 2] = 1  # a stripe
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    out = inpaint(gen, image, mask)
    seconds = time.perf_counter() - t
    known = (mask == 0).expand_as(image)
    return {
        "size": size,
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_before_mb": round(base, 1),
        "max_score_bytes": gen.attention.max_score_bytes,
        "known_pixels_identical": bool(torch.equal(out[known], image[known])),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_size(args.child)))
        return 0
    runs = []
    for size in args.sizes:
        cmd = [sys.executable, __file__, "--child", str(size)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)  # progress: sizes finish minutes apart
    print(json.dumps({"benchmark": "inpaint_large_cpu", "threads": args.threads or torch.get_num_threads(),
                      "goal_peak_rss_mb_2048": 8192, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
