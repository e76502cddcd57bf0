"""Contextual attention forward+backward: ours (batched, cheap propagation) vs a per-sample loop in the
references' style (``models.reference.reference_attention``: unbatched, unchunked, propagation as a 3x3
identity-kernel convolution over the score map).

Batch 8, 64x64x128 features (a 256x256 input), self-attention with per-sample box holes (128x128 image
holes -> 32x32 feature holes). Each variant runs in its own subprocess, alternating, so the peak-RSS figures
are separate; the timing is the median over all repeats. Prints one JSON object.

    .venv/bin/python benchmarks/contextual_attention.py [--rounds 2] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import ContextualAttention  # noqa: E402
from models.reference import reference_attention  # noqa: E402

B, C, H, W = 8, 128, 64, 64


def make_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g)
    mask = torch.zeros(B, 1, H, W)
    for i in range(B):
        t, l = int(torch.randint(0, H - 32, (1,), generator=g)), int(torch.randint(0, W - 32, (1,), generator=g))
        mask[i, :, t:t + 32, l:l + 32] = 1
    return x, mask


def run_variant(variant: str, repeats: int) -> dict:
    x, mask = make_inputs()
    att = ContextualAttention()

    def step():
        xi = x.clone().requires_grad_(True)
        if variant == "ours":
            y, _ = att(xi, xi, mask)
        else:
            y, _ = reference_attention(xi, xi, mask)
        y.square().mean().backward()

    step()  # warm-up
    times, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {"times_s": times, "cpu_s": cpu, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="subprocesses per variant (alternating)")
    ap.add_argument("--repeats", type=int, default=3, help="timed forward+backward passes per subprocess")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--variant", choices=["ours", "loop"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.variant:  # child process
        print(json.dumps(run_variant(args.variant, args.repeats)))
        return 0

    # agreement check (forward, once)
    x, mask = make_inputs()
    with torch.no_grad():
        diff = (ContextualAttention()(x, x, mask)[0] - reference_attention(x, x, mask)[0]).abs().max().item()
    results = {"ours": [], "loop": []}
    cpu = {"ours": [], "loop": []}  # process CPU seconds: less sensitive than wall time to a busy machine
    peaks = {"ours": 0.0, "loop": 0.0}
    cmd = [sys.executable, __file__, "--repeats", str(args.repeats)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    for _ in range(args.rounds):
        for variant in ("ours", "loop"):
            out = subprocess.run(cmd + ["--variant", variant], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[variant] += r["times_s"]
            cpu[variant] += r["cpu_s"]
            peaks[variant] = max(peaks[variant], r["peak_rss_mb"])
    med = {k: statistics.median(v) for k, v in results.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    print(json.dumps({
        "benchmark": "contextual_attention_fwd_bwd",
        "shape": {"batch": B, "channels": C, "height": H, "width": W},
        "threads": torch.get_num_threads(),
        "ours_median_s": round(med["ours"], 4),
        "loop_median_s": round(med["loop"], 4),
        "ratio_ours_over_loop": round(med["ours"] / med["loop"], 3),
        "goal_ratio": 0.4,
        "ours_median_cpu_s": round(med_cpu["ours"], 4),
        "loop_median_cpu_s": round(med_cpu["loop"], 4),
        "cpu_ratio_ours_over_loop": round(med_cpu["ours"] / med_cpu["loop"], 3),
        "ours_times_s": [round(t, 4) for t in results["ours"]],
        "loop_times_s": [round(t, 4) for t in results["loop"]],
        "ours_peak_rss_mb": round(peaks["ours"], 1),
        "loop_peak_rss_mb": round(peaks["loop"], 1),
        "max_abs_diff_forward": diff,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
